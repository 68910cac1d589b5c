"""`python -m jobs.benchmark extract_host [-- --batch 512 --size 224 --attr-size 160]`

The inference actor's host chain alone, no model: one decoded batch (as ``decode_block``
returns it: a binary ``px<S>`` column per input size, a few error rows) turned into the uint8
images a GPU copy starts from, and the model outputs turned back into the actor's Arrow output.
Side by side, on one thread (an actor's ``cpus_per_actor = 1``):

* before (issue 21): ``take`` -> ``to_pylist`` -> ``b"".join`` -> ``bytearray`` ->
  ``torch.frombuffer``, per column; the outputs scattered column by column;
* now: :func:`pipeline.extract.pixel_rows` (a view of the Arrow value buffer) plus the one copy
  into the staging buffer a GPU actor copies from (pinned memory when CUDA is present; on a CPU
  machine an ordinary buffer of the same size, so the same bytes are moved); the outputs built by
  the actor's own ``infer_output``.

Images/s per actor = batch rows / seconds per batch; the goal is >= 20,000 at 224 px.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _batch(n: int, sizes: tuple[int, ...], errors: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    bad = set(rng.choice(n, size=min(errors, n), replace=False).tolist())
    cols = {"image_id": [f"{i:06d}.jpg" for i in range(n)],
            "uri": [f"/data/img/{i:06d}.jpg" for i in range(n)],
            "shard": pa.array(np.zeros(n, np.int32)),
            "error": pa.array(["corrupt" if i in bad else None for i in range(n)], pa.string()),
            "content_hash": pa.array([f"{i:032x}" for i in range(n)], pa.string())}
    for s in sizes:
        px = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
        cols[f"px{s}"] = pa.array([None if i in bad else px[i].tobytes() for i in range(n)],
                                  pa.binary())
    return pa.table(cols)


def _old_inputs(torch, batch: pa.Table, good: np.ndarray, sizes) -> list:
    out = []
    for s in sizes:
        buf = b"".join(batch.column(f"px{s}").take(pa.array(good)).to_pylist())
        out.append(torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(len(good), s, s, 3))
    return out


def _new_inputs(torch, batch: pa.Table, sizes, staging: dict) -> list:
    from pipeline.extract import pixel_rows

    out = []
    for s in sizes:
        rows = pixel_rows(batch.column(f"px{s}"), s)
        buf = staging.get(s)
        if buf is None or buf.numel() < rows.size:
            buf = staging[s] = torch.empty(rows.size, dtype=torch.uint8,
                                           pin_memory=torch.cuda.is_available())
        host = buf[:rows.size].view(rows.shape)
        np.copyto(host.numpy(), rows)
        out.append(host)
    return out


def _old_output(batch: pa.Table, good: np.ndarray, probs: np.ndarray, emb: np.ndarray,
                schema: pa.Schema) -> pa.Table:
    n = batch.num_rows
    cols = []
    mask = np.ones(n, bool)
    mask[good] = False
    for j in range(probs.shape[1]):
        full = np.zeros(n, np.float32)
        full[good] = probs[:, j]
        cols.append(pa.array(full, pa.float32(), mask=mask))
    flat = np.zeros((n, emb.shape[1]), np.float32)
    flat[good] = emb
    emb_arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()),
                                                emb.shape[1], mask=pa.array(mask))
    arrays = [batch.column("image_id"), batch.column("uri"), batch.column("shard"),
              batch.column("error")] + cols + [emb_arr, batch.column("content_hash")]
    return pa.Table.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
                                 for a in arrays], schema=schema)


def _time(fn, seconds: float) -> tuple[float, float]:
    """(wall, CPU) seconds per call; CPU time of this thread is what one idle core would take,
    which matters on a shared machine whose load makes wall time meaningless."""
    fn()  # warm-up (allocations)
    n, t0, c0 = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - t0 < seconds or n < 3:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n, (time.thread_time() - c0) / n


def run(cfg, batch: int = 512, size: int = 224, attr_size: int = 160, errors: int = 4,
        dim: int = 2048, attributes: int = 40, seconds: float = 3.0) -> dict:
    import torch

    from pipeline import extract

    torch.set_num_threads(1)
    sizes = tuple(sorted({int(attr_size), int(size)}))
    b = _batch(int(batch), sizes, int(errors), cfg.run.seed)
    good = np.flatnonzero(pc.is_null(b.column("error")).to_numpy(zero_copy_only=False))
    names = [f"a{j}" for j in range(int(attributes))]
    schema = extract.infer_schema(names, int(dim))
    rng = np.random.default_rng(1)
    probs = rng.random((len(good), len(names)), dtype=np.float32)
    emb = rng.random((len(good), int(dim)), dtype=np.float32)

    old = [x.numpy().copy() for x in _old_inputs(torch, b, good, sizes)]
    staging: dict = {}
    new = [x.numpy().copy() for x in _new_inputs(torch, b, sizes, staging)]
    assert all(np.array_equal(o, n) for o, n in zip(old, new)), "chains disagree"

    new_out = extract.infer_output(b, good, probs, emb, schema)
    assert new_out.equals(_old_output(b, good, probs, emb, schema)), "outputs disagree"

    t_old_in, c_old_in = _time(lambda: _old_inputs(torch, b, good, sizes), seconds)
    t_new_in, c_new_in = _time(lambda: _new_inputs(torch, b, sizes, staging), seconds)
    t_old_out, c_old_out = _time(lambda: _old_output(b, good, probs, emb, schema), seconds)
    t_new_out, c_new_out = _time(lambda: extract.infer_output(b, good, probs, emb, schema),
                                 seconds)
    mb = sum(b.column(f"px{s}").nbytes for s in sizes) / 1e6
    res = {
        "batch": int(batch), "sizes_px": list(sizes), "pixel_mb_per_batch": round(mb, 1),
        "staging": "pinned" if torch.cuda.is_available() else "pageable (no CUDA here)",
        "before_inputs_ms": round(t_old_in * 1e3, 2),
        "now_inputs_ms": round(t_new_in * 1e3, 2),
        "before_outputs_ms": round(t_old_out * 1e3, 2),
        "now_outputs_ms": round(t_new_out * 1e3, 2),
        "before_images_per_s": round(batch / (t_old_in + t_old_out), 1),
        "now_images_per_s": round(batch / (t_new_in + t_new_out), 1),
        # per second of the thread's CPU time: the rate on one otherwise idle core
        "before_images_per_cpu_s": round(batch / (c_old_in + c_old_out), 1),
        "now_images_per_cpu_s": round(batch / (c_new_in + c_new_out), 1),
    }
    res["speedup"] = round(res["now_images_per_s"] / res["before_images_per_s"], 2)
    print(f"host chain per actor, {batch} x {sizes} px: before {res['before_images_per_s']:.0f} "
          f"img/s, now {res['now_images_per_s']:.0f} img/s ({res['speedup']}x); per CPU "
          f"second: before {res['before_images_per_cpu_s']:.0f}, now "
          f"{res['now_images_per_cpu_s']:.0f}")
    return res
