"""Integrations with other libraries; each module imports its library, so import them by name
(``import lsh_torch.integrations.transformers``), never from here."""
