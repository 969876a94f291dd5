//! "Why did it miss?": a normalised JSON view of a vertex's CacheMap, the pairing of the
//! vertices of two Definitions, and the list of fields that differ between two views.
//!
//! The view is the hashed JSON made readable: the exec wrapper becomes the `Exec` object
//! plus `platform`, file actions are decoded from their base64, and `deps` lists each
//! input's selector digest and content-based flag. Sources whose CacheMap needs
//! resolution are shown as their op body under `source`.

use base64::Engine as _;
use kiln_proto::gojson::to_go_json;
use kiln_proto::{Graph, OpKind, Vertex, VertexId, pb};
use serde_json::{Map, Value};

use super::map::CacheMap;

/// Errors from building the normalised view.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("cache map of op {op} is not JSON: {reason}")]
    NotJson { op: String, reason: String },
}

/// The normalised, comparable view of `vertex`'s CacheMap (`cm` as computed offline).
pub fn normalized(vertex: &Vertex, cm: Option<&CacheMap>) -> Result<Value, DiffError> {
    let bad = |reason: String| DiffError::NotJson {
        op: vertex.digest.to_string(),
        reason,
    };
    let parse = |bytes: &[u8]| -> Result<Value, DiffError> {
        serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))
    };
    let mut view = Map::new();
    let Some(cm) = cm else {
        let body = match &vertex.op.op {
            Some(pb::op::Op::Source(s)) => parse(&to_go_json(s))?,
            _ => Value::Null,
        };
        view.insert("source".into(), body);
        return Ok(Value::Object(view));
    };
    let hashed = cm.hashed.as_deref().unwrap_or_default();
    match vertex.kind() {
        OpKind::Exec => {
            let mut wrapper = parse(hashed)?;
            let exec = wrapper.get_mut("Exec").map(Value::take).unwrap_or_default();
            if let Value::Object(exec) = exec {
                view.extend(exec);
            }
            let mut platform = Map::new();
            for key in ["OS", "Arch", "Variant"] {
                if let Some(v) = wrapper.get(key) {
                    platform.insert(key.into(), v.clone());
                }
            }
            view.insert("platform".into(), Value::Object(platform));
        }
        OpKind::File => {
            let wrapper = parse(hashed)?;
            let actions = wrapper["Actions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|a| {
                    let b64 = a.as_str().unwrap_or_default();
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| bad(e.to_string()))?;
                    parse(&raw)
                })
                .collect::<Result<Vec<_>, _>>()?;
            view.insert("actions".into(), Value::Array(actions));
            if let Some(indexes) = wrapper.get("indexes") {
                view.insert("indexes".into(), indexes.clone());
            }
        }
        OpKind::Merge | OpKind::Diff | OpKind::Build => {
            if let Value::Object(obj) = parse(hashed)? {
                view.extend(obj.into_iter().filter(|(k, _)| k != "Type"));
            }
        }
        OpKind::Source | OpKind::Unknown => {
            view.insert(
                "key".into(),
                Value::String(String::from_utf8_lossy(hashed).into_owned()),
            );
        }
    }
    let deps = cm
        .deps
        .iter()
        .map(|d| {
            serde_json::json!({"selector": d.selector_str(), "content_based": d.content_based()})
        })
        .collect();
    view.insert("deps".into(), Value::Array(deps));
    Ok(Value::Object(view))
}

/// Field paths (`meta.env[2]`, `mounts[1].cacheOpt.sharing`) whose values differ;
/// a field present on one side only counts as different.
pub fn changed_fields(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(old, new, String::new(), &mut out);
    out
}

fn walk(old: &Value, new: &Value, path: String, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => walk(x, y, child, out),
                    _ => out.push(child),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let child = format!("{path}[{i}]");
                match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => walk(x, y, child, out),
                    _ => out.push(child),
                }
            }
        }
        (a, b) if a == b => {}
        _ => out.push(if path.is_empty() {
            ".".to_owned()
        } else {
            path
        }),
    }
}

/// How two Definitions' vertices correspond.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pairing {
    pub pairs: Vec<(VertexId, VertexId)>,
    pub removed: Vec<VertexId>,
    pub added: Vec<VertexId>,
}

/// Pairs vertices of the same kind: first by equal display name (in dependency order),
/// then the rest by position among the unpaired vertices of that kind.
pub fn pair_vertices(old: &Graph, new: &Graph) -> Pairing {
    let mut old_free: Vec<bool> = vec![true; old.vertices().len()];
    let mut new_match: Vec<Option<usize>> = vec![None; new.vertices().len()];
    for (n, nv) in new.vertices().iter().enumerate() {
        let found = old
            .vertices()
            .iter()
            .enumerate()
            .position(|(o, ov)| old_free[o] && ov.kind() == nv.kind() && ov.name == nv.name);
        if let Some(o) = found {
            old_free[o] = false;
            new_match[n] = Some(o);
        }
    }
    for (n, nv) in new.vertices().iter().enumerate() {
        if new_match[n].is_some() {
            continue;
        }
        let found = old
            .vertices()
            .iter()
            .enumerate()
            .position(|(o, ov)| old_free[o] && ov.kind() == nv.kind());
        if let Some(o) = found {
            old_free[o] = false;
            new_match[n] = Some(o);
        }
    }
    let mut pairing = Pairing::default();
    for (n, o) in new_match.iter().enumerate() {
        match o {
            Some(o) => pairing.pairs.push((VertexId(*o), VertexId(n))),
            None => pairing.added.push(VertexId(n)),
        }
    }
    pairing.removed = old_free
        .iter()
        .enumerate()
        .filter(|(_, free)| **free)
        .map(|(o, _)| VertexId(o))
        .collect();
    pairing
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_nested_and_one_sided_fields() {
        let old = json!({"meta":{"env":["A=1","B=2","C=3"]},"mounts":[{"input":0},{"cacheOpt":{"ID":"x"}}]});
        let new = json!({"meta":{"env":["A=1","B=2","C=4","D=5"]},"mounts":[{"input":0},{"cacheOpt":{"ID":"x","sharing":2}}]});
        assert_eq!(
            changed_fields(&old, &new),
            ["meta.env[2]", "meta.env[3]", "mounts[1].cacheOpt.sharing"]
        );
        assert!(changed_fields(&old, &old).is_empty());
    }
}
