//! Encoding LLB messages byte-for-byte as BuildKit's gogo code does.
//!
//! Only needed when kiln *produces* Definitions (builder, tests, fixtures): loading
//! always hashes the received bytes. prost already writes fields in ascending field
//! order, skips proto3 zero values and writes present sub-messages even when empty,
//! which is what gogo does. Two differences remain and are handled here:
//! * gogo writes both key and value of every map entry, even when empty or zero;
//!   prost skips default keys and values;
//! * gogo writes non-nullable message fields (`Range.start/end`) even when unset.
//!
//! Messages that (transitively) contain maps or non-nullable messages are encoded by
//! hand below; every other message goes through prost.

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};

use crate::pb;

/// Encodes a message exactly as BuildKit v0.11.6 (gogo, stable marshaler) would.
pub trait GogoEncode {
    /// Appends the message body (without tag or length) to `buf`.
    fn gogo_encode_raw(&self, buf: &mut Vec<u8>);

    /// The encoded message body.
    fn gogo_encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        self.gogo_encode_raw(&mut buf);
        buf
    }
}

fn put_len_delimited(buf: &mut Vec<u8>, tag: u32, body: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(body.len() as u64, buf);
    buf.extend_from_slice(body);
}

fn put_gogo<M: GogoEncode>(buf: &mut Vec<u8>, tag: u32, msg: &M) {
    put_len_delimited(buf, tag, &msg.gogo_encode());
}

fn put_prost<M: Message>(buf: &mut Vec<u8>, tag: u32, msg: &M) {
    put_len_delimited(buf, tag, &msg.encode_to_vec());
}

fn put_string(buf: &mut Vec<u8>, tag: u32, value: &str) {
    if !value.is_empty() {
        put_len_delimited(buf, tag, value.as_bytes());
    }
}

fn put_bytes(buf: &mut Vec<u8>, tag: u32, value: &[u8]) {
    if !value.is_empty() {
        put_len_delimited(buf, tag, value);
    }
}

fn put_varint(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

fn put_bool(buf: &mut Vec<u8>, tag: u32, value: bool) {
    put_varint(buf, tag, u64::from(value));
}

/// A map entry as gogo writes it: key (field 1) and value (field 2), both always.
fn put_map_entry(buf: &mut Vec<u8>, tag: u32, key: &str, value: impl FnOnce(&mut Vec<u8>)) {
    let mut entry = Vec::new();
    put_len_delimited(&mut entry, 1, key.as_bytes());
    value(&mut entry);
    put_len_delimited(buf, tag, &entry);
}

fn put_string_map(buf: &mut Vec<u8>, tag: u32, map: &std::collections::BTreeMap<String, String>) {
    for (key, value) in map {
        put_map_entry(buf, tag, key, |entry| {
            put_len_delimited(entry, 2, value.as_bytes())
        });
    }
}

impl GogoEncode for pb::Definition {
    fn gogo_encode_raw(&self, buf: &mut Vec<u8>) {
        for op in &self.def {
            put_len_delimited(buf, 1, op);
        }
        for (digest, metadata) in &self.metadata {
            put_map_entry(buf, 2, digest, |entry| put_gogo(entry, 2, metadata));
        }
        if let Some(source) = &self.source {
            put_gogo(buf, 3, source);
        }
    }
}

impl GogoEncode for pb::OpMetadata {
    fn gogo_encode_raw(&self, buf: &mut Vec<u8>) {
        put_bool(buf, 1, self.ignore_cache);
        put_string_map(buf, 2, &self.description);
        if let Some(export_cache) = &self.export_cache {
            put_prost(buf, 4, export_cache);
        }
        for (cap, enabled) in &self.caps {
            put_map_entry(buf, 5, cap, |entry| {
                encode_key(2, WireType::Varint, entry);
                encode_varint(u64::from(*enabled), entry);
            });
        }
        if let Some(group) = &self.progress_group {
            put_prost(buf, 6, group);
        }
    }
}

impl GogoEncode for pb::Op {
    fn gogo_encode_raw(&self, buf: &mut Vec<u8>) {
        for input in &self.inputs {
            put_prost(buf, 1, input);
        }
        match &self.op {
            Some(pb::op::Op::Exec(exec)) => put_prost(buf, 2, exec),
            Some(pb::op::Op::Source(source)) => put_gogo(buf, 3, source),
            Some(pb::op::Op::File(file)) => put_prost(buf, 4, file),
            Some(pb::op::Op::Build(build)) => put_gogo(buf, 5, build),
            Some(pb::op::Op::Merge(merge)) => put_prost(buf, 6, merge),
            Some(pb::op::Op::Diff(diff)) => put_prost(buf, 7, diff),
            None => {}
        }
        if let Some(platform) = &self.platform {
            put_prost(buf, 10, platform);
        }
        if let Some(constraints) = &self.constraints {
            put_prost(buf, 11, constraints);
        }
    }
}

impl GogoEncode for pb::SourceOp {
    fn gogo_encode_raw(&self, buf: &mut Vec<u8>) {
        put_string(buf, 1, &self.identifier);
        put_string_map(buf, 2, &self.attrs);
    }
}

impl GogoEncode for pb::BuildOp {
    fn gogo_encode_raw(&self, buf: &mut Vec<u8>) {
        // int64 is written as its two's-complement varint (10 bytes for negatives).
        put_varint(buf, 1, self.builder as u64);
        for (name, input) in &self.inputs {
            put_map_entry(buf, 2, name, |entry| put_prost(entry, 2, input));
        }
        if let Some(def) = &self.def {
            put_gogo(buf, 3, def);
        }
        put_string_map(buf, 4, &self.attrs);
    }
}

impl GogoEncode for pb::Source {
    fn gogo_encode_raw(&self, buf: &mut Vec<u8>) {
        for (digest, locations) in &self.locations {
            put_map_entry(buf, 1, digest, |entry| put_gogo(entry, 2, locations));
        }
        for info in &self.infos {
            put_gogo(buf, 2, info);
        }
    }
}

impl GogoEncode for pb::Locations {
    fn gogo_encode_raw(&self, buf: &mut Vec<u8>) {
        for location in &self.locations {
            put_gogo(buf, 1, location);
        }
    }
}

impl GogoEncode for pb::Location {
    fn gogo_encode_raw(&self, buf: &mut Vec<u8>) {
        put_varint(buf, 1, i64::from(self.source_index) as u64);
        for range in &self.ranges {
            put_gogo(buf, 2, range);
        }
    }
}

impl GogoEncode for pb::Range {
    fn gogo_encode_raw(&self, buf: &mut Vec<u8>) {
        // Non-nullable in gogo: always present on the wire.
        put_prost(buf, 1, &self.start.unwrap_or_default());
        put_prost(buf, 2, &self.end.unwrap_or_default());
    }
}

impl GogoEncode for pb::SourceInfo {
    fn gogo_encode_raw(&self, buf: &mut Vec<u8>) {
        put_string(buf, 1, &self.filename);
        put_bytes(buf, 2, &self.data);
        if let Some(def) = &self.definition {
            put_gogo(buf, 3, def);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_int64_is_a_ten_byte_varint() {
        let mount = pb::Mount {
            input: -1,
            output: -1,
            dest: "/".into(),
            ..Default::default()
        };
        let bytes = mount.encode_to_vec();
        assert_eq!(
            &bytes[..11],
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]
        );
    }

    #[test]
    fn map_entries_keep_empty_values_and_are_sorted() {
        let mut source = pb::SourceOp {
            identifier: "local://ctx".into(),
            ..Default::default()
        };
        source.attrs.insert("z".into(), String::new());
        source.attrs.insert("a".into(), "1".into());
        let bytes = source.gogo_encode();
        // identifier, then entry "a"="1", then entry "z"="" with an explicit empty value.
        let expected: Vec<u8> = [
            &[0x0a, 11][..],
            b"local://ctx",
            &[0x12, 6, 0x0a, 1, b'a', 0x12, 1, b'1'],
            &[0x12, 5, 0x0a, 1, b'z', 0x12, 0],
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn false_capability_values_are_written() {
        let mut md = pb::OpMetadata::default();
        md.caps.insert("x".into(), false);
        assert_eq!(md.gogo_encode(), vec![0x2a, 5, 0x0a, 1, b'x', 0x10, 0]);
    }

    #[test]
    fn oneof_member_is_written_in_field_order() {
        let op = pb::Op {
            inputs: vec![pb::Input {
                digest: "d".into(),
                index: 0,
            }],
            op: Some(pb::op::Op::Exec(pb::ExecOp::default())),
            platform: Some(pb::Platform {
                architecture: "amd64".into(),
                os: "linux".into(),
                ..Default::default()
            }),
            constraints: Some(pb::WorkerConstraints::default()),
        };
        let bytes = op.gogo_encode();
        assert_eq!(
            bytes,
            op.encode_to_vec(),
            "prost agrees when no maps are involved"
        );
        assert_eq!(&bytes[..5], &[0x0a, 3, 0x0a, 1, b'd']);
        assert_eq!(&bytes[5..7], &[0x12, 0], "empty exec body still present");
    }

    #[test]
    fn unset_range_positions_are_written() {
        let range = pb::Range::default();
        assert_eq!(range.gogo_encode(), vec![0x0a, 0, 0x12, 0]);
    }
}
