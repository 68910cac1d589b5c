"""Stage ``attribute_head``: a per-attribute logistic head on the face features, after extract.

The pixel CNN of ``train_attributes`` learns CelebA's attributes from 8,000 faces on CPU; dlib's
128-d face descriptor and the geometry of its 68 landmarks carry what it learns slowly (identity
cues for Male / Young, the mouth's opening and corners for Smiling / Mouth_Slightly_Open, eye
opening for Narrow_Eyes). The head combines the three, one logistic model per attribute on top of the CNN's own logit:

    x = [dlib descriptor (128), face geometry (dlib_face.GEOMETRY_DIM)]   (standardised)
    p_a = sigmoid(alpha_a * cnn_logit_a + w_a . x + b_a),   positive when p_a >= threshold_a

Why a stage after extract and not part of training: the descriptor and the landmarks come from
extract's dlib pool (the slow model, run once per image), and train runs before extract. So:

* **fit** (this run trained its attribute model): the features of the manifest's train split fit
  the head, train + val tune each threshold, test is scored beside the CNN alone
  (``models/attributes/head_metrics/``); the head is saved with the attribute model
  (``models/attributes/head.npz`` + ``head.json``, the json last = complete), so
  ``train.model_from`` carries it to other runs;
* **apply** (``train.model_from``): the head that came with the model is used as it is;
* either way every ``features/`` shard's ``p_<Attribute>`` columns are rewritten with the head's
  probabilities, so cluster, classify, audit and explain read the better ones unchanged. The
  CNN's own outputs stay in the ``attribute_logits`` column that extract writes with
  ``extract.face_geometry``, so refitting or reapplying gives the same table.

The head file is plain arrays (``numpy.load(allow_pickle=False)``): nothing in it is executed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage, tables
from pipeline.config import Config

log = logging.getLogger(__name__)

STAGE = "attribute_head"
MODEL_DIR = "models/attributes"  # the attribute model's folder (pipeline.train.MODEL_DIR)
HEAD_NPZ = "head.npz"
HEAD_JSON = "head.json"
METRICS_DIR = f"{MODEL_DIR}/head_metrics"
INPUTS = ("cnn", "embedding", "geometry")  # in this order in x
_COLUMNS = {"cnn": "attribute_logits", "embedding": "embedding", "geometry": "face_geometry"}

# models/attributes/head_metrics: test split, one row per attribute plus "__mean__".
METRICS_SCHEMA = pa.schema([
    pa.field("attribute", pa.string(), nullable=False),
    pa.field("n", pa.int64(), nullable=False),  # test images scored
    pa.field("accuracy", pa.float64()),  # the head, at its tuned threshold (train + val)
    pa.field("cnn_accuracy", pa.float64()),  # the CNN alone, at its own model.json threshold
    pa.field("majority_baseline", pa.float64()),  # always the test split's majority class
    pa.field("roc_auc", pa.float64()),  # the head's; null when test holds one class only
    pa.field("threshold", pa.float64()),  # the head's decision threshold
])


class HeadInputError(ValueError):
    """The features or the attribute model folder cannot feed the head; says what to set."""


class AttributeHead:
    """Per attribute: its own CNN logit plus a linear function of the face features.

    ``logit_a = alpha_a * cnn_a + w_a . (x - mean) / scale + b_a``. ``alpha_a`` starts at 1 and is
    not penalised, so the head starts from the CNN and the L2 penalty only holds back what the
    face features add (a full logistic regression on all 40 CNN logits did worse on real CelebA:
    the CNN's outputs on its own training images are more confident than on new ones). All
    attributes are fitted at once by full-batch L-BFGS from zeros (deterministic).

    Parameters
    ----------
    l2 : float
        L2 penalty on ``w``: ``l2 * A * sum(w**2) / (2 n)`` is added to the mean binary
        cross-entropy over the n training rows and A attributes.
    max_iter : int
        L-BFGS iterations.
    """

    def __init__(self, l2: float = 1.0, max_iter: int = 200):
        self.l2 = l2
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, cnn: np.ndarray | None, Y: np.ndarray, X_val: np.ndarray,
            cnn_val: np.ndarray | None, Y_val: np.ndarray) -> "AttributeHead":
        """Fit on face features ``X`` (n, d), CNN logits ``cnn`` (n, A) or None and labels ``Y``
        (n, A) bool; then tune each attribute's threshold on the train and val rows together."""
        import torch

        from pipeline.thresholds import tune_thresholds

        X, Y = np.asarray(X, np.float64), np.asarray(Y, bool)
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y) or not len(X):
            raise HeadInputError(f"the head needs X (n, d) and Y (n, A) with n > 0; got "
                                 f"{X.shape} and {Y.shape}")
        n, a = Y.shape
        self.mean_ = X.mean(axis=0)
        sd = X.std(axis=0)
        self.scale_ = np.where(sd > 1e-12, sd, 1.0)
        z = torch.tensor((X - self.mean_) / self.scale_, dtype=torch.float32)
        y = torch.tensor(Y, dtype=torch.float32)
        c = torch.tensor(np.zeros((n, a)) if cnn is None else cnn, dtype=torch.float32)
        w = torch.zeros(X.shape[1], a, dtype=torch.float32, requires_grad=True)
        b = torch.zeros(a, dtype=torch.float32, requires_grad=True)
        alpha = torch.full((a,), 0.0 if cnn is None else 1.0, dtype=torch.float32,
                           requires_grad=cnn is not None)
        params = [w, b] + ([alpha] if cnn is not None else [])
        opt = torch.optim.LBFGS(params, max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b + alpha * c, y)
            loss = loss + self.l2 * a * (w ** 2).sum() / (2 * n)
            loss.backward()
            return loss

        # one thread: on the shared 2-core machine torch's default pool made the same fit 5x
        # slower (215 s vs 44 s for 4,000 x 288 at load ~55), and one thread is reproducible
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            opt.step(closure)
        finally:
            torch.set_num_threads(threads)
        self.coef_ = w.detach().numpy().T.copy()  # (A, d)
        self.intercept_ = b.detach().numpy().copy()
        self.cnn_coef_ = alpha.detach().numpy().copy()
        # thresholds on train + val: val alone (999 faces on real CelebA) moved the rare
        # attributes' thresholds by chance; train + val scored higher in every probe (train.md)
        both = np.vstack([X, np.asarray(X_val, np.float64)])
        both_cnn = None if cnn is None else np.vstack([cnn, cnn_val])
        self.thresholds_ = tune_thresholds(np.vstack([Y, np.asarray(Y_val, bool)]),
                                            self.predict_proba(both, both_cnn))
        return self

    def predict_proba(self, X: np.ndarray, cnn: np.ndarray | None) -> np.ndarray:
        """``(n, A)`` probabilities of the positive class."""
        z = (np.asarray(X, np.float64) - self.mean_) / self.scale_
        logit = z @ self.coef_.T + self.intercept_
        if cnn is not None:
            logit = logit + self.cnn_coef_ * np.asarray(cnn, np.float64)
        return 1.0 / (1.0 + np.exp(-logit))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean_, scale=self.scale_, coef=self.coef_,
                 intercept=self.intercept_, cnn_coef=self.cnn_coef_, thresholds=self.thresholds_)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "AttributeHead":
        z = np.load(io.BytesIO(blob), allow_pickle=False)
        head = cls()
        head.mean_, head.scale_, head.coef_ = z["mean"], z["scale"], z["coef"]
        head.intercept_, head.cnn_coef_ = z["intercept"], z["cnn_coef"]
        head.thresholds_ = z["thresholds"]
        return head


def head_inputs(feats: pa.Table, inputs: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """The head's face features ``(n, d)`` (embedding, geometry, as ``inputs`` names them) and
    the CNN's logits ``(n, A)`` (None without "cnn") for every row of a features table."""
    missing = [_COLUMNS[i] for i in inputs if _COLUMNS[i] not in feats.column_names]
    if missing:
        raise HeadInputError(
            f"the attribute head reads the features columns {missing}, which this run's "
            f"features/ lacks; extract writes them with extract.embedding = \"dlib\" and "
            f"extract.face_geometry = true (or set head.enabled = false)")

    def block(name: str) -> np.ndarray:
        col = feats.column(_COLUMNS[name]).combine_chunks()
        return col.flatten().to_numpy().reshape(len(col), col.type.list_size).astype(np.float64)

    face = [block(i) for i in ("embedding", "geometry") if i in inputs]
    if not face:
        raise HeadInputError(f"head.inputs = {inputs} names no face features; add \"embedding\" "
                             f"or \"geometry\"")
    return np.hstack(face), (block("cnn") if "cnn" in inputs else None)


def _labels(cfg: Config, feats: pa.Table, attributes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n, A) bool and split (n,) of the features' rows, from the manifest."""
    man = tables.read(cfg, "manifest", columns=["image_id", "split", *attributes])
    idx = pc.index_in(feats["image_id"], man["image_id"]).to_numpy(zero_copy_only=False)
    man = man.take(pa.array(idx))
    Y = np.stack([man[a].to_numpy(zero_copy_only=False) for a in attributes], axis=1)
    return Y.astype(bool), man["split"].to_numpy(zero_copy_only=False)


def _metrics(attributes: list[str], y: np.ndarray, p: np.ndarray, thresholds: np.ndarray,
             cnn_p: np.ndarray, cnn_thresholds: np.ndarray) -> pa.Table:
    from sklearn.metrics import roc_auc_score

    rows = []
    for j, a in enumerate(attributes):
        yt = y[:, j]
        rows.append({"attribute": a, "n": int(len(yt)),
                     "accuracy": float(((p[:, j] >= thresholds[j]) == yt).mean()),
                     "cnn_accuracy": float(((cnn_p[:, j] >= cnn_thresholds[j]) == yt).mean()),
                     "majority_baseline": float(max(yt.mean(), 1 - yt.mean())),
                     "roc_auc": (float(roc_auc_score(yt, p[:, j])) if 0 < yt.sum() < len(yt)
                                 else None),
                     "threshold": float(thresholds[j])})
    mean = {"attribute": "__mean__", "n": int(len(y))}
    for f in METRICS_SCHEMA.names[2:]:
        vals = [r[f] for r in rows if r[f] is not None]
        mean[f] = float(np.mean(vals)) if vals else None
    return pa.Table.from_pylist(rows + [mean], schema=METRICS_SCHEMA)


def _fit(cfg: Config, feats: pa.Table, attributes: list[str], info) -> tuple[AttributeHead, dict]:
    h = cfg.head
    X, cnn = head_inputs(feats, list(h.inputs))
    Y, split = _labels(cfg, feats, attributes)
    rows = {s: split == s for s in ("train", "val", "test")}
    empty = [s for s, m in rows.items() if not m.any()]
    if empty:
        raise HeadInputError(f"the attribute head is fitted on train, tuned on train + val and "
                             f"scored on test; the features hold no row of {empty}")
    tr, va = rows["train"], rows["val"]
    head = AttributeHead(l2=h.l2, max_iter=h.max_iter).fit(
        X[tr], None if cnn is None else cnn[tr], Y[tr],
        X[va], None if cnn is None else cnn[va], Y[va])
    te = rows["test"]
    cnn_p = np.stack([feats[f"p_{a}"].to_numpy() for a in attributes], axis=1)[te]
    cnn_t = np.asarray(info.thresholds or [0.5] * len(attributes))
    metrics = _metrics(attributes, Y[te],
                       head.predict_proba(X[te], None if cnn is None else cnn[te]),
                       head.thresholds_, cnn_p, cnn_t)
    tables.replace(cfg, METRICS_DIR, metrics, schema=METRICS_SCHEMA)
    mean = metrics.slice(len(attributes), 1).to_pylist()[0]
    return head, {"test_mean_accuracy": round(mean["accuracy"], 4),
                  "cnn_test_mean_accuracy": round(mean["cnn_accuracy"], 4),
                  "train_rows": int(rows["train"].sum()), "test_rows": int(te.sum())}


def run(cfg: Config) -> dict:
    """Fit (or take from ``train.model_from``) the head and rewrite features' probabilities."""
    from pipeline.models import AttributeModelInfo

    t0 = time.time()
    h = cfg.head
    if not h.enabled:
        # done, not skipped: nothing is missing, the run asked for the CNN's probabilities
        return {"enabled": False, "reason": "head.enabled = false: features keep the CNN's "
                                            "probabilities"}
    model_loc = tables.location(cfg, MODEL_DIR)
    info = AttributeModelInfo.from_json(storage.read_bytes(model_loc.join("model.json")).decode())
    attributes = list(info.attributes)
    feats = tables.read(cfg, "features")
    meta_loc, npz_loc = model_loc.join(HEAD_JSON), model_loc.join(HEAD_NPZ)
    if cfg.train.model_from:
        if not storage.exists(meta_loc):
            raise HeadInputError(f"head.enabled = true, but the attribute model taken from "
                                 f"{cfg.train.model_from} (train.model_from) came without a head "
                                 f"({HEAD_JSON}); set head.enabled = false, or take the model "
                                 f"from a run whose attribute_head stage fitted one")
        meta = json.loads(storage.read_bytes(meta_loc).decode())
        blob = storage.read_bytes(npz_loc)
        head = AttributeHead.from_bytes(blob)
        if (meta["attributes"] != attributes
                or meta.get("attribute_model_version") != info.version):
            raise HeadInputError(f"{meta_loc.uri} was fitted on the outputs of another attribute "
                                 f"model (version {meta.get('attribute_model_version')!r}, this "
                                 f"one {info.version!r}); take both from the same finished run")
        inputs, result = list(meta["inputs"]), {"mode": "applied", "head_from":
                                                 cfg.train.model_from}
    else:
        storage.delete(meta_loc)  # until the new head is complete, no reader takes the old one
        head, result = _fit(cfg, feats, attributes, info)
        inputs, blob = list(h.inputs), head.to_bytes()
        storage.write_bytes(npz_loc, blob)
        meta = {"attributes": attributes, "inputs": inputs, "l2": h.l2, "max_iter": h.max_iter,
                "attribute_model_version": info.version,
                "geometry_dim": _dim(feats, "face_geometry"),
                "embedding_dim": _dim(feats, "embedding"), "metrics": result,
                "sha256": hashlib.sha256(blob).hexdigest()}
        storage.write_bytes(meta_loc, json.dumps(meta, indent=2, sort_keys=True).encode())
        result["mode"] = "fitted"
    version = f"sha256:{hashlib.sha256(blob).hexdigest()[:16]}"
    rows = _rewrite_features(cfg, head, inputs, attributes, version)
    return {**result, "head_version": version, "inputs": inputs, "features_rows": rows,
            "seconds": round(time.time() - t0, 2)}


def _dim(feats: pa.Table, column: str) -> int | None:
    return feats.schema.field(column).type.list_size if column in feats.column_names else None


def _rewrite_features(cfg: Config, head: AttributeHead, inputs: list[str], attributes: list[str],
                      version: str) -> int:
    """Each features shard again, its ``p_`` columns the head's (schema and metadata kept)."""
    loc = tables.location(cfg, "features")
    n = 0
    for path in storage.parquet_files(loc):
        base = path.rsplit("/", 1)[-1]
        with loc.fs.open_input_file(path) as f:
            part = pq.read_table(f)
        p = head.predict_proba(*head_inputs(part, inputs)).astype(np.float32)
        for j, a in enumerate(attributes):
            i = part.schema.get_field_index(f"p_{a}")
            part = part.set_column(i, part.schema.field(i), pa.array(p[:, j], pa.float32()))
        meta = {k.decode(): v.decode() for k, v in (part.schema.metadata or {}).items()}
        meta["faceaudit.attribute_head"] = version
        meta["faceaudit.attribute_head_thresholds"] = json.dumps(
            [float(t) for t in head.thresholds_])
        storage.write_table(part, loc, name=base, metadata=meta)
        n += part.num_rows
    return n
