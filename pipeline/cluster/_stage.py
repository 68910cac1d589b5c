"""The cluster stage: build the spaces, sweep on Ray, keep the chosen k, describe, write."""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import storage, tables
from pipeline.cluster import _describe as describe
from pipeline.cluster._fit import SweepSpec, choose_k, hdbscan_min_cluster_size, sweep_one
from pipeline.cluster._schemas import (ASSIGNMENTS_SCHEMA, CENTROID_DISTANCES_SCHEMA,
                                       CONDITIONAL_SCHEMA, DEMOGRAPHICS_SCHEMA, PRIMARY_SCHEMA,
                                       PROFILES_SCHEMA, Settings, sweep_schema)
from pipeline.cluster._spaces import BUILDERS, Inputs, Space, load_inputs
from pipeline.config import Config
from pipeline.progress import gather
from pipeline.seeds import derive_seed, sample_indices
from pipeline.stages import StageSkipped

log = logging.getLogger(__name__)
STAGE = "cluster"


@dataclass
class SpaceJob:
    """One space's shared inputs of the sweep (each is put in the object store once)."""

    space: Space
    references: dict[str, np.ndarray]  # reference attribute -> int8 labels of the space's rows
    sample_idx: np.ndarray  # rows agglomerative / hdbscan are fitted on
    sil_idx: np.ndarray  # rows silhouette is computed on

    @classmethod
    def seeded(cls, cfg: Config, space: Space, references: dict[str, np.ndarray]) -> SpaceJob:
        """The job of ``space`` with its seeded fit and silhouette samples (cluster.sample_rows,
        cluster.silhouette_rows)."""
        c, n = cfg.cluster, space.X.shape[0]
        return cls(space, references,
                   sample_indices(n, c.sample_rows, cfg.run.seed, STAGE, "sample", space.name),
                   sample_indices(n, c.silhouette_rows, cfg.run.seed, STAGE, "silhouette",
                                  space.name))


def sweep_specs(cfg: Config, job: SpaceJob) -> tuple[list[SweepSpec], list[str]]:
    """The sweep tasks of one space, and notes on k values that cannot be fitted."""
    c = cfg.cluster
    n, sample_n = job.space.X.shape[0], len(job.sample_idx)
    ks = list(range(c.k_min, c.k_max + 1))
    if c.k and c.k not in ks:
        ks.append(c.k)  # a fixed k outside the sweep range is fitted too, so it can be chosen
    specs, notes = [], []
    for algo in c.algorithms:
        if algo == "hdbscan":
            mcs = hdbscan_min_cluster_size(sample_n, c.k_max)
            specs.append(SweepSpec(job.space.name, algo, 0,
                                   derive_seed(cfg.run.seed, STAGE, job.space.name, algo),
                                   c.minibatch_threshold, min_cluster_size=mcs))
            continue
        limit = (sample_n if algo == "agglomerative" else n) - 1
        for k in ks:
            if k > limit:
                notes.append(f"{job.space.name}/{algo}: k={k} skipped, only {limit + 1} rows")
                continue
            specs.append(SweepSpec(job.space.name, algo, k,
                                   derive_seed(cfg.run.seed, STAGE, job.space.name, algo, k),
                                   c.minibatch_threshold))
    return specs, notes


def _sweep_task(X, spec, sample_idx, sil_idx, references):
    labels_needed = spec.algorithm in ("agglomerative", "hdbscan")
    return sweep_one(X, spec, sample_idx if labels_needed else None, sil_idx, references)


def run_sweep(jobs: list[SpaceJob], specs: dict[str, list[SweepSpec]], parallel: bool = True,
              cpus_per_task: float = 1.0, x_refs: dict | None = None, fetch_labels: bool = True
              ) -> list[tuple[dict, np.ndarray]]:
    """Every spec of every space: through Ray tasks, or one after another in this process.

    On Ray each space's matrix, references and samples are put in the object store once and
    every task of the space gets the same references, so a 202,599-row matrix is shipped once,
    not once per k. ``x_refs`` (space -> ObjectRef) reuses matrices the caller already put.
    Each task returns its sweep rows and every spec's labels as separate objects, so with
    ``fetch_labels=False`` the labels stay in the object store as ObjectRefs and the caller
    fetches only the chosen k's (every k's labels of every row would grow the driver by
    rows x specs x 4 bytes: 80 MB at 202,599 rows and 100 specs).
    """
    if not parallel:
        return [_sweep_task(j.space.X, s, j.sample_idx, j.sil_idx, j.references)
                for j in jobs for s in specs[j.space.name]]
    import ray

    from pipeline.ray_runtime import cluster_cpus

    task = ray.remote(num_cpus=cpus_per_task)(_sweep_chunk)
    puts, groups = {}, []
    slots = max(1, int(cluster_cpus() / cpus_per_task))
    for j in jobs:
        x_ref = (x_refs or {}).get(j.space.name) or ray.put(j.space.X)
        puts[j.space.name] = (x_ref, ray.put(j.sample_idx), ray.put(j.sil_idx),
                              ray.put(j.references))
        groups.append((j, _chunks(j, specs[j.space.name], -(-slots * _WAVES // len(jobs)))))
    # Each task fits a chunk of one space's specs (costs balanced, longest chunks submitted
    # first), so a task's fixed cost (scheduling, fetching the matrix, results) is paid a few
    # times per core, not once per k; results come back in spec order.
    todo = [(j, chunk) for j, chunks in groups for chunk in chunks]
    refs = [None] * len(todo)
    for i in sorted(range(len(todo)),
                    key=lambda i: -sum(_task_cost(todo[i][0], s) for s in todo[i][1])):
        j, chunk = todo[i]
        x_ref, s_ref, sil_ref, ref_ref = puts[j.space.name]
        mem = max(_memory_request(s, j.sample_idx) for s in chunk)
        opts = {"num_returns": 1 + len(chunk), **({"memory": mem} if mem else {})}
        refs[i] = task.options(**opts).remote(x_ref, chunk, s_ref, sil_ref, ref_ref)
    by_spec = {}
    sweep_rows = gather([out[0] for out in refs], STAGE, "sweep", unit="tasks")
    for (j, chunk), out, rows in zip(todo, refs, sweep_rows):
        labels = ray.get(out[1:]) if fetch_labels else out[1:]
        for s, row, lab in zip(chunk, rows, labels):
            by_spec[(j.space.name, id(s))] = (row, lab)
    return [by_spec[(j.space.name, id(s))] for j in jobs for s in specs[j.space.name]]


# Tasks per task slot (CPUs / cpus_per_task) across the whole sweep: enough for the
# longest-first order to even out the cores' finishing times, few enough that per-task costs
# (measured: ~0.1 s each on a loaded 2-core machine, 48 one-spec tasks took 1.4x the loop) stay a
# small share.
_WAVES = 3


def _chunks(job: SpaceJob, specs: list[SweepSpec], n_chunks: int) -> list[list[SweepSpec]]:
    """``specs`` in at most ``n_chunks`` groups of similar total cost (greedy: the costliest
    spec to the cheapest group). Ward tasks that need a memory reservation stay alone."""
    alone = [s for s in specs if _memory_request(s, job.sample_idx)]
    rest = sorted((s for s in specs if not _memory_request(s, job.sample_idx)),
                  key=lambda s: -_task_cost(job, s))
    bins: list[list[SweepSpec]] = [[] for _ in range(max(1, min(n_chunks, len(rest))))]
    loads = [0.0] * len(bins)
    for s in rest:
        i = loads.index(min(loads))
        bins[i].append(s)
        loads[i] += _task_cost(job, s)
    return [[s] for s in alone] + [b for b in bins if b]


def _sweep_chunk(X, chunk, sample_idx, sil_idx, references):
    """The chunk's sweep rows, then each spec's labels (one return value each)."""
    out = [_sweep_task(X, s, sample_idx, sil_idx, references) for s in chunk]
    return ([row for row, _ in out], *(labels for _, labels in out))


def _task_cost(job: SpaceJob, spec: SweepSpec) -> float:
    """Rough relative cost of one sweep task (only its rank matters: the submission order).
    K-Means: rows x k x dim x restarts; GMM (full covariance): rows x k x dim^2; Ward and
    HDBSCAN: sample^2 x dim; plus the scores, silhouette's sil_rows^2 x dim."""
    n, d = job.space.X.shape
    s = len(job.sample_idx) if job.sample_idx is not None else n
    if spec.algorithm == "kmeans":
        fit = n * spec.k * d * 3 * 30.0
    elif spec.algorithm == "gmm":
        fit = n * spec.k * d * d * 20.0
    else:
        fit = float(s) * s * d
    return fit + float(len(job.sil_idx)) ** 2 * d


# Below this a task's memory is not worth reserving (Ray's scheduler ignores small footprints).
_MEMORY_FLOOR = 512 * 1024**2


def _memory_request(spec: SweepSpec, sample_idx: np.ndarray | None) -> int:
    """Bytes to reserve for one sweep task: Ward linkage holds an n x n float64 distance matrix
    (n = the sample it is fitted on), which is 3.2 GB at 20,000 rows and would otherwise let Ray
    pack several such tasks on one node and run it out of memory. 0 = no reservation."""
    if spec.algorithm != "agglomerative" or sample_idx is None:
        return 0
    need = int(len(sample_idx)) ** 2 * 8
    return need if need >= _MEMORY_FLOOR else 0


def _map_task(X, idx, method, seed):
    return describe.embed_2d(X[idx], method, seed)


def _check_config(cfg: Config) -> None:
    c = cfg.cluster
    if c.primary_algorithm not in c.algorithms:
        raise ValueError(f"cluster.primary_algorithm={c.primary_algorithm!r} is not among "
                         f"cluster.algorithms={c.algorithms}; add it or pick one of them")
    if c.map_method == "umap" and importlib.util.find_spec("umap") is None:
        raise ValueError("cluster.map_method='umap' but the umap-learn package is not "
                         "installed; `pip install umap-learn` or set cluster.map_method='tsne'")
    if not c.spaces or not c.algorithms:
        raise ValueError("cluster.spaces and cluster.algorithms must each name at least one entry")


def _drop_parts_except(cfg: Config, name: str, keep: list[str]) -> None:
    """Delete the parts of table ``name`` not in ``keep`` (a previous run's extra parts)."""
    loc = tables.location(cfg, name)
    keep_paths = {loc.join(f"{p}.parquet").path for p in keep}
    for path in storage.parquet_files(loc):
        if path not in keep_paths:
            loc.fs.delete_file(path)


def _profile_source(inp: Inputs) -> tuple[str, list[str]]:
    """Ground-truth attributes when the manifest has them, else predicted ones (p >= 0.5)."""
    if inp.attributes:
        return "annotations", list(inp.attributes)
    names = [n[2:] for n in inp.features.column_names if n.startswith("p_")]
    return "predicted", names


def _attribute_matrix(inp: Inputs, source: str, names: list[str],
                      ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, known) bool matrices of ``names`` for the rows ``ids``."""
    if source == "annotations":
        pos = np.searchsorted(inp.image_ids, ids)
        M = np.stack([inp.truth[a][pos] for a in names], axis=1)
        V = np.stack([inp.valid[a][pos] for a in names], axis=1)
        return M, V
    pos = np.searchsorted(inp.feature_ids(), ids)
    P = np.stack([inp.features[f"p_{a}"].to_numpy(zero_copy_only=False)[pos] for a in names], 1)
    return P >= 0.5, np.isfinite(P)


def run(cfg: Config) -> dict:
    """Cluster every configured space with every algorithm; write ``clusters/*``.

    Returns row counts, the chosen k and metrics per space x algorithm, skipped spaces with
    their reasons, and ``primary_space_used`` (the space behind ``clusters/primary``).
    """
    import ray

    from pipeline.ray_runtime import ensure_ray

    _check_config(cfg)
    ensure_ray(cfg)  # a no-op under run_stage or a test's Ray; honours cfg.ray otherwise
    c = cfg.cluster
    t_start = time.time()
    inp = load_inputs(cfg, need_embedding="embedding" in c.spaces)
    if not inp.attributes and inp.features is None:
        raise StageSkipped("the manifest has no annotated attributes and there is no features "
                           "table: nothing to cluster (run the extract stage first)")
    source, attr_names = _profile_source(inp)
    spaces, skipped, x_refs = _build_spaces(cfg, inp, source)
    jobs, specs, notes, refs_missing = _sweep_jobs(cfg, inp, spaces, source, attr_names)
    map_idx, map_refs = _start_maps(cfg, spaces, x_refs)  # alongside the sweep
    t0 = time.time()
    results = run_sweep(jobs, specs, parallel=True, cpus_per_task=c.cpus_per_task,
                        x_refs=x_refs, fetch_labels=False)
    sweep_s = time.time() - t0
    coords = {name: ray.get(r) for name, r in map_refs.items()}
    n_tasks = len(results)
    chosen, chosen_labels, sweep_rows = _choose(cfg, results)
    del results  # the other k's labels leave the object store
    primary_space, pk = _primary(cfg, spaces, skipped, chosen, chosen_labels, notes)
    meta = Settings(spaces=tuple(c.spaces), k_rule=c.k_rule, k=c.k, primary_space=primary_space,
                    primary_algorithm=c.primary_algorithm, primary_k=int(pk),
                    profile_source=source, map_method=c.map_method).metadata()
    described, demo_missing = _describe_chosen(cfg, inp, spaces, chosen, chosen_labels, map_idx,
                                               coords, source, attr_names, primary_space, meta)
    rows = _write(cfg, sweep_rows, described, meta)
    ident_col = _write_identity(cfg, rows, meta)
    tables.clear_errors(cfg, STAGE)
    if inp.errors:
        tables.write_errors(cfg, STAGE, inp.errors)
    return {
        "rows": rows,
        "spaces": {n: {"rows": int(s.X.shape[0]), **s.info} for n, s in spaces.items()},
        "skipped_spaces": skipped,
        "chosen": chosen,
        "primary_space_used": primary_space,
        "primary_algorithm": c.primary_algorithm,
        "primary_k": int(pk),
        "profile_source": source,
        "identity_column": ident_col,
        "reference_attributes_missing": refs_missing,
        "demographic_attributes_missing": demo_missing,
        "notes": notes,
        "sweep_tasks": n_tasks,
        "sweep_seconds": round(sweep_s, 2),
        "seconds": round(time.time() - t_start, 2),
        "errors": len(inp.errors),
    }


def _build_spaces(cfg: Config, inp: Inputs, source: str
                  ) -> tuple[dict[str, Space], dict[str, str], dict]:
    """The feature spaces that can be clustered (each matrix put in the object store once), why
    each other one was skipped, and the spaces' ObjectRefs."""
    import ray

    c = cfg.cluster
    spaces, skipped, x_refs = {}, {}, {}
    for name in c.spaces:
        space, why = BUILDERS[name](cfg, inp)
        if space is None:
            skipped[name] = why
            log.warning("[cluster] space %s skipped: %s", name, why)
        elif space.X.shape[0] < max(3, c.k_min + 1):
            skipped[name] = f"only {space.X.shape[0]} rows"
            log.warning("[cluster] space %s skipped: only %d rows", name, space.X.shape[0])
        else:
            # Into the object store once (every sweep and map task reads it from there); the
            # driver keeps the store's zero-copy view instead of its own copy, so it holds no
            # rows x dims matrix of its own (the three spaces are ~100 MB at 202,599 rows).
            x_refs[name] = ray.put(space.X)
            space.X = ray.get(x_refs[name])
            spaces[name] = space
    if source == "annotations" and inp.features is not None:
        # the p_ columns were only needed for the semantic space (built above)
        inp.features = inp.features.select(["image_id"])
    if not spaces:
        raise StageSkipped("no feature space could be built: " +
                           "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return spaces, skipped, x_refs


def _sweep_jobs(cfg: Config, inp: Inputs, spaces: dict[str, Space], source: str,
                attr_names: list[str]):
    """Per space its job (reference labels, seeded samples) and sweep tasks; notes on k values
    that cannot be fitted; reference attributes without labels and why."""
    c = cfg.cluster
    refs_missing = {}
    jobs, specs, notes = [], {}, []
    for name, sp in spaces.items():
        M, V = _attribute_matrix(inp, source, [a for a in c.reference_attributes
                                               if a in attr_names], sp.image_ids)
        references = {}
        for j, a in enumerate(a for a in c.reference_attributes if a in attr_names):
            if not V[:, j].all():
                refs_missing[a] = "has null values"
                continue
            references[a] = M[:, j].astype(np.int8)
        for a in c.reference_attributes:
            if a not in attr_names:
                refs_missing[a] = f"not among the {source} attributes"
        job = SpaceJob.seeded(cfg, sp, references)
        jobs.append(job)
        specs[name], more = sweep_specs(cfg, job)
        notes += more
    for a, why in refs_missing.items():
        log.warning("[cluster] reference attribute %s: %s (its NMI/ARI/purity are null)", a, why)
    return jobs, specs, notes, refs_missing


def _start_maps(cfg: Config, spaces: dict[str, Space], x_refs: dict):
    """Start the 2-D map task of every space (t-SNE is the slowest single step here, so it runs
    alongside the sweep); returns the map rows and the task refs."""
    import ray

    c = cfg.cluster
    map_task = ray.remote(num_cpus=c.cpus_per_task)(_map_task)
    map_idx, map_refs = {}, {}
    for name, sp in spaces.items():
        map_idx[name] = sample_indices(sp.X.shape[0], c.map_rows, cfg.run.seed, STAGE, "map", name)
        map_refs[name] = map_task.remote(x_refs[name], map_idx[name], c.map_method,
                                         derive_seed(cfg.run.seed, STAGE, "map", name))
    return map_idx, map_refs


def _choose(cfg: Config, results: list[tuple[dict, object]]):
    """Choose k per space x algorithm (``chosen`` marks it in the sweep rows); keep the chosen
    labels only (ObjectRefs). Returns (chosen summary, chosen labels, sweep rows)."""
    c = cfg.cluster
    by_key: dict[tuple[str, str], list[tuple[dict, object]]] = {}
    for row, labels in results:
        by_key.setdefault((row["space"], row["algorithm"]), []).append((row, labels))
    chosen, chosen_labels = {}, {}
    for (space, algo), items in by_key.items():
        rows = [r for r, _ in items]
        if algo == "hdbscan":
            k, why = rows[0]["k"], f"found by HDBSCAN ({rows[0]['param']})"
        else:
            k, why = choose_k(rows, c.k_rule, c.k)
        for r, labels in items:
            r["chosen"] = r["k"] == k
            if r["chosen"]:
                chosen_labels[(space, algo)] = labels  # an ObjectRef: fetched when described
                chosen[f"{space}/{algo}"] = {
                    "k": int(k), "rule": why,
                    **{m: (None if r[m] is None else round(r[m], 4)) for m in
                       ("silhouette", "davies_bouldin", "calinski_harabasz")}}
    sweep_rows = [r for r, _ in results]
    for r in sweep_rows:
        for a in c.reference_attributes:
            for m in ("nmi", "ari", "purity"):
                r.setdefault(f"{m}_{a}", None)
    return chosen, chosen_labels, sweep_rows


def _primary(cfg: Config, spaces: dict[str, Space], skipped: dict[str, str], chosen: dict,
             chosen_labels: dict, notes: list[str]) -> tuple[str, int]:
    """The one clustering downstream stages use: (space used, its chosen k)."""
    c = cfg.cluster
    primary_space = c.primary_space
    if primary_space not in spaces:
        fallback = "annotations" if "annotations" in spaces else sorted(spaces)[0]
        log.warning("[cluster] primary space %s is missing (%s); clusters/primary uses %s",
                    primary_space, skipped.get(primary_space, "not in cluster.spaces"), fallback)
        primary_space = fallback
    if (primary_space, c.primary_algorithm) not in chosen_labels:
        raise ValueError(f"no {c.primary_algorithm} clustering of the {primary_space} space "
                         f"could be fitted ({'; '.join(notes) or 'no sweep rows'}); give the "
                         "stage more rows or lower cluster.k_min")
    return primary_space, chosen[f"{primary_space}/{c.primary_algorithm}"]["k"]


def _describe_chosen(cfg: Config, inp: Inputs, spaces: dict[str, Space], chosen: dict,
                     chosen_labels: dict, map_idx: dict, coords: dict, source: str,
                     attr_names: list[str], primary_space: str, meta: dict
                     ) -> tuple[dict[str, object], dict[str, str]]:
    """Describe the chosen clusterings, one at a time: each one's labels are fetched from the
    object store and its assignments written as their own part, so the driver never holds
    every clustering's rows at once. Returns the profiles, centroid distances, demographics,
    P(A | B) over the dataset, assignment row count and the primary table; demographic
    attributes not found."""
    import ray

    c = cfg.cluster
    prof, dists, demo = [], [], []
    demo_missing = {}
    n_assigned, parts = 0, []
    for (space, algo), labels_ref in sorted(chosen_labels.items()):
        labels = ray.get(labels_ref)
        sp = spaces[space]
        k = int(chosen[f"{space}/{algo}"]["k"])
        key = {"space": space, "algorithm": algo, "k": k}
        x = np.full(len(labels), np.nan, dtype=np.float32)
        y = x.copy()
        x[map_idx[space]], y[map_idx[space]] = coords[space][:, 0], coords[space][:, 1]
        ids = pa.array(sp.image_ids, pa.string())
        part = f"part-{len(parts):05d}"
        n_assigned += tables.write(cfg, "clusters/assignments", pa.table({
            "image_id": ids,
            "space": pa.repeat(pa.scalar(space, pa.string()), len(labels)),
            "algorithm": pa.repeat(pa.scalar(algo, pa.string()), len(labels)),
            "k": pa.array(np.full(len(labels), k, dtype=np.int32)),
            "cluster": pa.array(labels.astype(np.int32)),
            "x": pa.array(x, mask=np.isnan(x)), "y": pa.array(y, mask=np.isnan(y)),
        }), schema=ASSIGNMENTS_SCHEMA, part=part, metadata=meta)
        parts.append(part)
        if (space, algo) == (primary_space, c.primary_algorithm):
            primary = pa.table({"image_id": ids, "cluster": pa.array(labels.astype(np.int32))})
        M, V = _attribute_matrix(inp, source, attr_names, sp.image_ids)
        prof += describe.profiles(key, labels, M, V, attr_names, source, c.label_terms,
                                  exclude=cfg.classify.target)
        dists += describe.centroid_distances(key, sp.X, labels)
        demo_cols = {}
        for a in c.demographic_attributes:
            if a in attr_names:
                j = attr_names.index(a)
                demo_cols[a] = np.where(V[:, j], np.where(M[:, j], "true", "false"),
                                        None).astype(object)
            elif a not in inp.demographics:
                demo_missing[a] = f"not among the {source} attributes"
        pos = np.searchsorted(inp.image_ids, sp.image_ids)
        for name, values in inp.demographics.items():
            demo_cols[name] = values[pos]
        demo += describe.demographics(key, labels, demo_cols)
        del M, V, labels, demo_cols
    _drop_parts_except(cfg, "clusters/assignments", parts)
    if source == "annotations":
        cond = describe.conditional_batched(
            lambda lo, hi: _attribute_matrix(inp, source, attr_names, inp.image_ids[lo:hi]),
            len(inp.image_ids), attr_names, source)
    else:
        fids = inp.feature_ids()
        cond = describe.conditional_batched(
            lambda lo, hi: _attribute_matrix(inp, source, attr_names, fids[lo:hi]),
            len(fids), attr_names, source)
    return {"profiles": prof, "centroid_distances": dists, "demographics": demo,
            "conditional": cond, "assignments": n_assigned, "primary": primary}, demo_missing


def _write(cfg: Config, sweep_rows: list[dict], described: dict, meta: dict) -> dict[str, int]:
    """Write the ``clusters/*`` tables (assignments are written while described); row counts."""
    c = cfg.cluster
    prof, dists = described["profiles"], described["centroid_distances"]
    cond, demo = described["conditional"], described["demographics"]
    return {
        "clusters/sweep": tables.replace(cfg, "clusters/sweep", pa.Table.from_pylist(
            sweep_rows, schema=sweep_schema(c.reference_attributes)),
            schema=sweep_schema(c.reference_attributes), metadata=meta),
        "clusters/assignments": described["assignments"],
        "clusters/profiles": tables.replace(cfg, "clusters/profiles", pa.Table.from_pylist(
            prof, schema=PROFILES_SCHEMA), schema=PROFILES_SCHEMA, metadata=meta),
        "clusters/centroid_distances": tables.replace(
            cfg, "clusters/centroid_distances", pa.Table.from_pylist(
                dists, schema=CENTROID_DISTANCES_SCHEMA), schema=CENTROID_DISTANCES_SCHEMA),
        "clusters/conditional": tables.replace(cfg, "clusters/conditional", pa.Table.from_pylist(
            cond, schema=CONDITIONAL_SCHEMA), schema=CONDITIONAL_SCHEMA, metadata=meta),
        "clusters/demographics": tables.replace(cfg, "clusters/demographics", pa.Table.from_pylist(
            demo, schema=DEMOGRAPHICS_SCHEMA), schema=DEMOGRAPHICS_SCHEMA, metadata=meta),
        "clusters/primary": tables.replace(cfg, "clusters/primary", described["primary"],
                                           schema=PRIMARY_SCHEMA, metadata=meta),
    }


def _write_identity(cfg: Config, rows: dict[str, int], meta: dict) -> str | None:
    """S3: identity purity of every kept clustering, where the manifest names people; adds its
    row count to ``rows`` and returns the identity column used (None: none)."""
    from pipeline.cluster._identity import IDENTITY_COLUMNS, identity_table
    from pipeline.cluster._schemas import ASSIGNMENTS, IDENTITY, IDENTITY_SCHEMA

    man_cols = storage.read_schema(tables.location(cfg, "manifest")).names
    # read back with only the key columns: assignments were written one clustering at a time
    rows_assign = tables.read(cfg, ASSIGNMENTS,
                              columns=["image_id", "space", "algorithm", "k", "cluster"])
    ident, ident_col = identity_table(rows_assign, tables.read(
        cfg, "manifest", columns=["image_id", *[c for c in IDENTITY_COLUMNS if c in man_cols]]),
        seed=derive_seed(cfg.run.seed, STAGE, "identity"))
    storage.delete(tables.location(cfg, IDENTITY))  # none of an earlier run survives
    if ident is not None:
        rows[IDENTITY] = tables.replace(cfg, IDENTITY, ident,
                                        schema=IDENTITY_SCHEMA, metadata=meta)
    return ident_col
