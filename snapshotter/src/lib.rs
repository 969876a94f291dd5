//! kiln-snapshotter owns every filesystem a build step sees and every result it leaves:
//! immutable and mutable refs stored as overlay layers, their persistent metadata, and
//! OCI layer import and export.
