"""The audit stage's tables (under ``<output.root>/audit/``), declared once here."""

from __future__ import annotations

import pyarrow as pa

DUPLICATES = "audit/duplicates"
LABEL_CONFLICTS = "audit/label_conflicts"
LEAKAGE = "audit/leakage"
LEAKAGE_COUNTS = "audit/leakage_counts"
LABEL_ISSUES = "audit/label_issues"
ISSUE_RATES = "audit/label_issue_rates"
SUMMARY = "audit/summary"

DUPLICATES_SCHEMA = pa.schema([
    pa.field("group", pa.int64(), nullable=False),  # duplicate group id (unique within kind)
    pa.field("kind", pa.string(), nullable=False),  # exact (same bytes) | near (embedding)
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("identity", pa.int32()),  # manifest identity (CelebA / LFW), null when unknown
    pa.field("content_hash", pa.string(), nullable=False),
    # cosine distance to the closest other member (0 for a byte-identical twin)
    pa.field("distance", pa.float64(), nullable=False),
    pa.field("group_size", pa.int32(), nullable=False),
    pa.field("labels_agree", pa.bool_(), nullable=False),  # every annotation equal in the group
    pa.field("conflicting", pa.list_(pa.string()), nullable=False),  # annotations that differ
])

LABEL_CONFLICTS_SCHEMA = pa.schema([
    pa.field("group", pa.int64(), nullable=False),  # as in audit/duplicates
    pa.field("kind", pa.string(), nullable=False),
    pa.field("attribute", pa.string(), nullable=False),  # the annotation that differs
    pa.field("n_images", pa.int32(), nullable=False),
    pa.field("n_values", pa.int32(), nullable=False),  # distinct non-null values in the group
    pa.field("image_ids", pa.list_(pa.string()), nullable=False),  # members, sorted
    pa.field("values", pa.list_(pa.string()), nullable=False),  # each member's value, aligned
    pa.field("splits", pa.list_(pa.string()), nullable=False),  # each member's split, aligned
])

LEAKAGE_SCHEMA = pa.schema([
    # exact_duplicate | near_duplicate | identity
    pa.field("kind", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),  # duplicate group id or identity
    pa.field("image_id", pa.string(), nullable=False),  # every member of a leaking group
    pa.field("split", pa.string(), nullable=False),
])

LEAKAGE_COUNTS_SCHEMA = pa.schema([
    pa.field("kind", pa.string(), nullable=False),
    pa.field("split_a", pa.string(), nullable=False),  # split_a < split_b in train, val, test order
    pa.field("split_b", pa.string(), nullable=False),
    pa.field("groups", pa.int64(), nullable=False),  # groups / identities present in both splits
    pa.field("images", pa.int64(), nullable=False),  # their images in either of the two splits
])

LABEL_ISSUES_SCHEMA = pa.schema([
    pa.field("attribute", pa.string(), nullable=False),  # the audited label
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("given", pa.string(), nullable=False),  # the annotation (age as its age group)
    pa.field("predicted", pa.string(), nullable=False),  # argmax of the out-of-sample model
    pa.field("p_given", pa.float64(), nullable=False),  # out-of-sample probability of `given`
    # cleanlab label quality (self-confidence), 0..1; low = probably wrong
    pa.field("quality", pa.float64(), nullable=False),
    pa.field("is_issue", pa.bool_(), nullable=False),  # cleanlab confident-learning verdict
    pa.field("rank", pa.int64(), nullable=False),  # 1 = most suspect of this attribute
])

ISSUE_RATES_SCHEMA = pa.schema([
    pa.field("attribute", pa.string(), nullable=False),  # the audited label
    pa.field("group_by", pa.string(), nullable=False),  # overall | cluster | <sensitive attribute>
    pa.field("group", pa.string(), nullable=False),  # the group's value ("all" for overall)
    pa.field("n", pa.int64(), nullable=False),
    pa.field("issues", pa.int64(), nullable=False),
    pa.field("rate", pa.float64(), nullable=False),  # issues / n
    # chi-square test of independence, issue x group (repeated on each row of a grouping)
    pa.field("chi2", pa.float64()),
    pa.field("dof", pa.int32()),
    pa.field("p_value", pa.float64()),
    pa.field("significant", pa.bool_()),  # p_value < audit.alpha
])

SUMMARY_SCHEMA = pa.schema([
    pa.field("metric", pa.string(), nullable=False),  # e.g. exact_groups, label_issues
    pa.field("attribute", pa.string()),  # for per-attribute metrics, else null
    pa.field("value", pa.float64(), nullable=False),
])

SCHEMAS: dict[str, pa.Schema] = {
    DUPLICATES: DUPLICATES_SCHEMA, LABEL_CONFLICTS: LABEL_CONFLICTS_SCHEMA,
    LEAKAGE: LEAKAGE_SCHEMA, LEAKAGE_COUNTS: LEAKAGE_COUNTS_SCHEMA,
    LABEL_ISSUES: LABEL_ISSUES_SCHEMA, ISSUE_RATES: ISSUE_RATES_SCHEMA, SUMMARY: SUMMARY_SCHEMA,
}
