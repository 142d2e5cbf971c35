"""TensorFlow's two CPU thread pools, set once per process (TF Serving's ``--tensorflow_intra_op_parallelism``
and ``--tensorflow_inter_op_parallelism``).

The server and ``carclf bench`` both call :func:`configure`, so that a benchmark compares the served model
with in-process calls under the same threading.
"""

from __future__ import annotations

POOLS = ("intra_op", "inter_op")


def counts(intra_op: int = 0, inter_op: int = 0) -> dict[str, int]:
    """{pool: count} in ``POOLS`` order (0: TensorFlow's default)."""
    return dict(zip(POOLS, (intra_op, inter_op), strict=True))


def configure(intra_op: int = 0, inter_op: int = 0) -> list[str]:
    """Give this process's TensorFlow ``intra_op`` threads inside one op and ``inter_op`` threads across ops;
    0 leaves TensorFlow's own choice (one per core).

    Works only before TensorFlow runs anything. Returns the pools that kept another count because
    TensorFlow was already running (empty when everything asked for is in place).
    """
    import tensorflow as tf

    setters = {"intra_op": tf.config.threading.set_intra_op_parallelism_threads,
               "inter_op": tf.config.threading.set_inter_op_parallelism_threads}
    refused = []
    for pool, count in counts(intra_op, inter_op).items():
        if count < 0:
            raise ValueError(f"{pool} threads must be >= 0, received {count}")
        if not count:
            continue
        try:
            setters[pool](count)  # a no-op when TensorFlow already has this count
        except RuntimeError:
            refused.append(pool)
    return refused


def server_flags(intra_op: int = 0, inter_op: int = 0) -> list[str]:
    """The server's flags for these counts, e.g. ["--tensorflow_intra_op_parallelism=1"] (0s left out)."""
    return [f"--tensorflow_{pool}_parallelism={count}" for pool, count in counts(intra_op, inter_op).items() if count]


def describe(intra_op: int, inter_op: int) -> str:
    """E.g. "intra-op 1, inter-op TensorFlow's default" for logs and reports."""
    default = "TensorFlow's default"
    return ", ".join(f"{pool.replace('_', '-')} {count or default}" for pool, count in counts(intra_op, inter_op).items())
