"""Lock-free (Hogwild) training of the XMC network: processes update one shared model, no locks.

    python examples/hogwild_xmc.py                       # 1 then 2 processes, same total examples
    python examples/hogwild_xmc.py --procs 1,2,4 --epochs 3 --labels 200000
    python examples/hogwild_xmc.py --help                # its options; most of examples/xmc.py's work too

The paper's other claim: with LSH, a step touches few rows of the wide layers, so processes that
update shared weights without locks rarely collide and asynchronous SGD scales near-linearly.
This is PyTorch's Hogwild example with examples/xmc.py's network (imported, not copied): sparse
features -> EmbeddingBag (sparse gradients) -> 128 ReLU -> LSHLinear(sparse_grad=True) head in
shared mode. ``net.share_memory()`` puts the weights in shared memory; each of P processes
(``torch.multiprocessing``, spawn, one thread each) trains on its 1/P of the training points,
``--epochs`` passes over its part, so every P trains on the same total examples; the wall time
is what should shrink. The processes stop at the end of each epoch while the parent evaluates
P@1 on the eval subset (not timed): P@1 against training wall time.

Optimizer: xmc.py's (LazyAdam for the embedding and the head, SparseAdam's arithmetic;
Adam for the hidden bias) with per-process state: the moments are private, the weights shared.
Why not plain SGD: xmc.py's learning rate is tuned for Adam, and SGD would need its own search;
why not shared moments: Adam's moment updates would race like the weights do, with no sparsity
argument for them being harmless. The cost: each process keeps its own moments (2 x the head's
size per process) and each moment sees only its process's gradients.

Hash tables are per process: each process's LSHLinear rebuilds its tables from the shared weights
on its own schedule (a rebuild replaces the table tensors, so they leave shared memory), and its
step counter, warm-up and random tails are its own (seed offset by the process index).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # noqa: E402
import xmc  # noqa: E402  (sets OMP_WAIT_POLICY=PASSIVE before torch starts its threads)
import xmc_data  # noqa: E402


def worker(rank: int, net: xmc.XMCNet, part: xmc_data.XMCData, args, barrier) -> None:
    # Ctrl-C reaches every process of the group: the parent's to handle (it exits, which ends its daemon workers),
    # not one traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def exit_with_the_parent() -> None:  # killed (timeout, the OOM killer), it cannot stop us: hung workers held its memory
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=exit_with_the_parent, daemon=True).start()
    try:
        train_part(rank, net, part, args, barrier)
    except BaseException:
        barrier.abort()  # the parent and the other workers stop waiting for this one (they hung)
        raise


def watch(workers, finished: threading.Event) -> None:
    """In the parent: a worker killed without a Python exception (SIGKILL, the OOM killer) never aborts
    the barrier, where the parent and the other workers would wait for it forever: stop the parent as
    a SIGTERM does (see main; its wait is a blocking semaphore that only a signal interrupts)."""
    while not finished.wait(1.0):
        dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
        if dead:
            print(f"a worker died (exit code {dead[0]}): stopping", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def train_part(rank: int, net: xmc.XMCNet, part: xmc_data.XMCData, args, barrier) -> None:
    # One thread per process: P processes already fill P cores, more threads oversubscribe them.
    torch.set_num_threads(1)
    net.out.seed = args.seed + rank  # independent tails (the same seed would draw the same ones)
    opts = xmc.optimizers(net, "lsh", *xmc.learning_rates("lsh", args), args.weight_decay)  # this process's own moments
    net.train()
    barrier.wait()  # started: the parent's clock begins
    for epoch in range(args.epochs):
        for batch in part.batches(args.batch_size, seed=args.seed + 1000 * rank + epoch):
            loss = xmc.loss_fn(net, "lsh", batch, args.uncorrected, label_smoothing=args.label_smoothing)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in opts:
                opt.step()  # in place on the shared weights, no lock
        barrier.wait()  # epoch done everywhere: the parent evaluates
        barrier.wait()  # evaluated: go on


def hogwild(procs: int, train_data, eval_data, test_data, args) -> dict:
    """Train on ``procs`` processes; P@1 after each epoch against training wall time, final P@k."""
    parts = [train_data.subset(np.arange(r, len(train_data), procs)) for r in range(procs)]
    budget = max(xmc.active_budget(p, args, "shared", args.seed + 1000 * r) for r, p in enumerate(parts))
    try:  # an option the layer refuses (--bits, --tables, --tail, ...): argparse's kind of message, no traceback
        net = xmc.build("lsh", "shared", parts[0], args, budget)  # warm-up counted in a part's steps
    except (TypeError, ValueError) as error:
        cli.fail(str(error))
    net.share_memory()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    # Daemons: a parent that exits, by an error or a SIGTERM (see main), terminates them.
    workers = [ctx.Process(target=worker, args=(r, net, parts[r], args, barrier), daemon=True) for r in range(procs)]
    for w in workers:
        w.start()
    finished = threading.Event()
    threading.Thread(target=watch, args=(workers, finished), daemon=True).start()
    curve = [(0.0, 0, xmc.evaluate(net, "lsh", eval_data)[0]["P@1"])]
    seconds = 0.0
    try:
        barrier.wait()
        for epoch in range(args.epochs):
            start = time.perf_counter()
            barrier.wait()
            seconds += time.perf_counter() - start
            curve.append((seconds, epoch + 1, xmc.evaluate(net, "lsh", eval_data)[0]["P@1"]))
            print(f"  {procs} process(es), epoch {epoch + 1}: {seconds:6.1f}s  P@1 {curve[-1][2]:.3f}", flush=True)
            barrier.wait()
    except threading.BrokenBarrierError:  # a worker failed (its traceback is above): the others stop too
        barrier.abort()
    for w in workers:
        w.join()
    finished.set()
    for w in workers:
        if w.exitcode:
            raise SystemExit(f"a worker of the {procs}-process run failed (exit code {w.exitcode})")
    steps = sum(math.ceil(len(p) / args.batch_size) for p in parts) * args.epochs
    return {"procs": procs, "budget": budget, "steps": steps, "seconds": seconds, "curve": curve,
            "final": xmc.evaluate(net, "lsh", test_data)[0]}


# examples/xmc.py's options that do not apply here.
NOT_HERE = ("--runs", "--mode", "--active-per-row", "--dense-epochs", "--eval-every", "--test-fraction", "--threads",
            "--plot", "--json", "--data", "--test-data", "--max-points", "--generate", "--save-head", "--device",
            "--final-points")


def parse_args(argv=None):
    """examples/xmc.py's arguments, with ``procs`` (the process counts) added."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], add_help=True,
        allow_abbrev=False,  # --pro 4 is xmc.py's --probes, not this parser's --procs
        epilog="Other options (synthetic data, --epochs, --lr, LSHLinear settings) are examples/xmc.py's; the head is "
               "lsh in shared mode, on cpu, evaluated after every epoch, results printed (" + ", ".join(NOT_HERE)
               + " are refused).")
    parser.add_argument("--procs", type=cli.integers(), default="1,2", help="process counts to compare, in order")
    own, rest = parser.parse_known_args(argv)
    args = xmc.parse_args(rest)
    # Read off the parsed options (xmc.py's parser takes abbreviations): accepted and ignored, they made a
    # run other than the one asked for (--json wrote nothing).
    default = xmc.parse_args(["--quick"] if args.quick else [])
    for option in NOT_HERE:
        dest = option[2:].replace("-", "_")
        if getattr(args, dest) != getattr(default, dest):
            parser.error(f"{option}: examples/xmc.py's only; here the head is lsh in shared mode, on cpu, on "
                         "synthetic data, evaluated after every epoch, and nothing is written")
    args.procs = own.procs
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    counts = args.procs
    # SIGTERM (timeout, kill, a job scheduler) as an exit, which terminates the daemon workers; by default
    # the parent died alone and they waited at the barrier forever.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    train_data, test_data = xmc_data.generate_split(args.train_points, args.test_points, seed=args.seed,
                                                    num_features=args.features, num_labels=args.labels,
                                                    structure=args.structure)
    eval_data = test_data.subset(np.random.default_rng(args.seed).permutation(len(test_data))[:args.eval_points])
    print(f"synthetic data: {train_data.summary()}\n{os.cpu_count()} cores; torch {torch.__version__}, "
          f"one thread per process; {args.epochs} epochs over each process's part, batch {args.batch_size}")
    results = []
    for procs in counts:
        results.append(hogwild(procs, train_data, eval_data, test_data, args))
    base = results[0]
    print(f"\n{'processes':>9}{'budget':>8}{'steps':>7}{'train s':>9}{'speed-up':>10}{'P@1':>8}{'P@3':>8}{'P@5':>8}"
          f"   P@1 after each epoch (eval subset)")
    for r in results:
        print(f"{r['procs']:>9}{r['budget']:>8}{r['steps']:>7}{r['seconds']:>9.1f}{base['seconds'] / r['seconds']:>9.2f}x"
              f"{r['final']['P@1']:>8.3f}{r['final']['P@3']:>8.3f}{r['final']['P@5']:>8.3f}   "
              + " ".join(f"{p1:.3f}@{s:.0f}s" for s, _, p1 in r["curve"][1:]))
    print("same total examples for every process count; train s = wall time of the training steps "
          f"(evaluation excluded); speed-up against {base['procs']} process(es); P@k on the full test split")
    return results


if __name__ == "__main__":
    cli.run(main)
