//! Reading parameter subtrees from Flax checkpoints: msgpack as written by
//! `flax.serialization.to_bytes` (read with `rmpv`) and safetensors (read with `safetensors`).
//!
//! Both readers return the arrays under one path of the tree (e.g. `params` or
//! `params/encoder/layers_0/attention`), keyed by their path relative to it (`query/kernel`).
//! Nothing here panics on bad bytes: a truncated or corrupt file, an unknown dtype or a buffer
//! of the wrong size is an [`AttnError::Checkpoint`] naming the entry.

use std::collections::BTreeMap;

use half::{bf16, f16};
use rmpv::ValueRef;

use crate::array::Array;
use crate::element::DType;
use crate::error::{AttnError, num_elements};

/// flax's `_MsgpackExtType.ndarray`.
const EXT_NDARRAY: i8 = 1;
/// flax's `_MsgpackExtType.npscalar`.
const EXT_NPSCALAR: i8 = 3;
/// The key flax writes into a map that holds a chunked (> 2^30 bytes) array.
const CHUNKED: &str = "__msgpack_chunked_array__";

fn corrupt(path: &str, expected: impl Into<String>, found: impl Into<String>) -> AttnError {
    AttnError::Checkpoint {
        path: path.to_owned(),
        expected: expected.into(),
        found: found.into(),
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}/{name}")
    }
}

/// The arrays of a `flax.serialization.to_bytes` file under `path` (`/`-separated map keys;
/// `""` = the whole file), keyed by their path relative to `path`.
pub fn msgpack_subtree(bytes: &[u8], path: &str) -> Result<BTreeMap<String, Array>, AttnError> {
    let mut rd = bytes;
    let root = rmpv::decode::read_value_ref(&mut rd).map_err(|e| {
        corrupt(
            "<file>",
            "a msgpack value (flax.serialization.to_bytes)",
            e.to_string(),
        )
    })?;
    if !rd.is_empty() {
        return Err(corrupt(
            "<file>",
            "one msgpack value",
            format!("{} trailing bytes after it", rd.len()),
        ));
    }
    let mut node = &root;
    let mut here = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        here = join(&here, part);
        node = map_get(node, part).ok_or_else(|| {
            corrupt(
                &here,
                "a map entry (subtree of the checkpoint)",
                describe(node, part),
            )
        })?;
    }
    let mut out = BTreeMap::new();
    collect(node, "", path, &mut out)?;
    Ok(out)
}

fn describe(node: &ValueRef<'_>, part: &str) -> String {
    match node {
        ValueRef::Map(entries) => {
            let keys: Vec<String> = entries
                .iter()
                .filter_map(|(k, _)| as_str(k).map(str::to_owned))
                .collect();
            format!("no key `{part}` (keys: {})", keys.join(", "))
        }
        other => format!("not a map but {}", kind(other)),
    }
}

fn kind(v: &ValueRef<'_>) -> &'static str {
    match v {
        ValueRef::Nil => "nil",
        ValueRef::Boolean(_) => "a bool",
        ValueRef::Integer(_) => "an integer",
        ValueRef::F32(_) | ValueRef::F64(_) => "a float",
        ValueRef::String(_) => "a string",
        ValueRef::Binary(_) => "binary data",
        ValueRef::Array(_) => "an array",
        ValueRef::Map(_) => "a map",
        ValueRef::Ext(..) => "an extension object",
    }
}

fn as_str<'v>(v: &'v ValueRef<'_>) -> Option<&'v str> {
    match v {
        ValueRef::String(s) => s.as_str(),
        _ => None,
    }
}

fn map_get<'v, 'a>(node: &'v ValueRef<'a>, key: &str) -> Option<&'v ValueRef<'a>> {
    match node {
        ValueRef::Map(entries) => entries
            .iter()
            .find(|(k, _)| as_str(k) == Some(key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// Walks a subtree: maps recurse, extension objects are arrays.
fn collect(
    node: &ValueRef<'_>,
    rel: &str,
    prefix: &str,
    out: &mut BTreeMap<String, Array>,
) -> Result<(), AttnError> {
    let full = join(prefix, rel);
    match node {
        ValueRef::Map(entries) if map_get(node, CHUNKED).is_some() => {
            out.insert(rel.to_owned(), chunked(node, &full)?);
            let _ = entries;
        }
        ValueRef::Map(entries) => {
            for (k, v) in entries {
                let key = as_str(k).ok_or_else(|| corrupt(&full, "string keys", kind(k)))?;
                collect(v, &join(rel, key), prefix, out)?;
            }
        }
        ValueRef::Ext(EXT_NDARRAY | EXT_NPSCALAR, payload) => {
            out.insert(rel.to_owned(), ndarray_payload(payload, &full)?);
        }
        other => {
            return Err(corrupt(
                &full,
                "a map or an ndarray (msgpack ext type 1)",
                match other {
                    ValueRef::Ext(t, _) => format!("an extension object of type {t}"),
                    v => kind(v).to_owned(),
                },
            ));
        }
    }
    Ok(())
}

/// An ext-1 payload: msgpack `[shape, dtype name, buffer]`.
fn ndarray_payload(payload: &[u8], path: &str) -> Result<Array, AttnError> {
    let expected = "an ndarray payload [shape, dtype, buffer]";
    let mut rd = payload;
    let v = rmpv::decode::read_value_ref(&mut rd)
        .map_err(|e| corrupt(path, expected, e.to_string()))?;
    let ValueRef::Array(items) = &v else {
        return Err(corrupt(path, expected, kind(&v)));
    };
    let [shape, dtype, buffer] = items.as_slice() else {
        return Err(corrupt(
            path,
            expected,
            format!("an array of {} items", items.len()),
        ));
    };
    let ValueRef::Array(dims) = shape else {
        return Err(corrupt(path, "a shape (array of integers)", kind(shape)));
    };
    let shape = dims
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| {
            corrupt(
                path,
                "a shape of non-negative integers",
                format!("{dims:?}"),
            )
        })?;
    let name = as_str(dtype).ok_or_else(|| corrupt(path, "a dtype name", kind(dtype)))?;
    let ValueRef::Binary(buf) = buffer else {
        return Err(corrupt(
            path,
            "the array's bytes (msgpack bin)",
            kind(buffer),
        ));
    };
    decode(path, name, &shape, buf)
}

/// A chunked array: `{"__msgpack_chunked_array__": true, "shape": {"0": n0, ..}, "chunks":
/// {"0": ext, ..}}`: the chunks, concatenated in key order, reshaped.
fn chunked(node: &ValueRef<'_>, path: &str) -> Result<Array, AttnError> {
    let indexed = |key: &str| -> Result<Vec<&ValueRef<'_>>, AttnError> {
        let m =
            map_get(node, key).ok_or_else(|| corrupt(path, format!("a `{key}` entry"), "none"))?;
        let ValueRef::Map(entries) = m else {
            return Err(corrupt(path, format!("`{key}` as a map"), kind(m)));
        };
        let mut v: Vec<(usize, &ValueRef<'_>)> = entries
            .iter()
            .map(|(k, v)| {
                as_str(k)
                    .and_then(|s| s.parse().ok())
                    .map(|i| (i, v))
                    .ok_or_else(|| {
                        corrupt(path, format!("`{key}` keys \"0\", \"1\", ..."), kind(k))
                    })
            })
            .collect::<Result<_, _>>()?;
        v.sort_by_key(|(i, _)| *i);
        Ok(v.into_iter().map(|(_, v)| v).collect())
    };
    let shape = indexed("shape")?
        .into_iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| corrupt(path, "a shape of non-negative integers", "other values"))?;
    let mut values = Vec::new();
    let mut dtype = None;
    for c in indexed("chunks")? {
        let ValueRef::Ext(EXT_NDARRAY, payload) = c else {
            return Err(corrupt(path, "chunks as ndarrays", kind(c)));
        };
        let a = ndarray_payload(payload, path)?;
        if dtype.is_some_and(|d| d != a.dtype()) {
            return Err(corrupt(path, "chunks of one dtype", a.dtype().name()));
        }
        dtype = Some(a.dtype());
        values.extend(a.to_f64_vec());
    }
    let dtype = dtype.unwrap_or(DType::F32);
    let n = num_elements("checkpoint", &shape).map_err(|_| {
        corrupt(
            path,
            "a shape whose element count fits in memory",
            format!("shape {shape:?}"),
        )
    })?;
    if n != values.len() {
        return Err(corrupt(
            path,
            format!("{n} elements for shape {shape:?}"),
            format!("{} in the chunks", values.len()),
        ));
    }
    Array::from_f64(dtype, &values, shape)
}

/// Little-endian row-major bytes of a numpy dtype name -> [`Array`].
fn decode(path: &str, dtype: &str, shape: &[usize], buf: &[u8]) -> Result<Array, AttnError> {
    let Some(dt) = DType::from_name(dtype) else {
        return Err(corrupt(
            path,
            "dtype float32, float64, bfloat16, float16, int32 or bool",
            format!("dtype {dtype:?}"),
        ));
    };
    let n = num_elements("checkpoint", shape).map_err(|_| {
        corrupt(
            path,
            "a shape whose element count fits in memory",
            format!("shape {shape:?}"),
        )
    })?;
    let size = match dt {
        DType::F64 => 8,
        DType::F32 | DType::I32 => 4,
        DType::BF16 | DType::F16 => 2,
        DType::Bool => 1,
    };
    if n.checked_mul(size) != Some(buf.len()) {
        return Err(corrupt(
            path,
            format!("{} bytes ({dtype} {shape:?})", n.saturating_mul(size)),
            format!("{} bytes", buf.len()),
        ));
    }
    let shape = shape.to_vec();
    macro_rules! le {
        ($n:literal, $f:expr) => {
            buf.chunks_exact($n)
                .map(|c| {
                    let mut b = [0u8; $n];
                    b.copy_from_slice(c);
                    $f(b)
                })
                .collect::<Vec<_>>()
        };
    }
    match dt {
        DType::F32 => Array::new(le!(4, f32::from_le_bytes), shape),
        DType::F64 => Array::new(le!(8, f64::from_le_bytes), shape),
        DType::BF16 => Array::new(le!(2, bf16::from_le_bytes), shape),
        DType::F16 => Array::new(le!(2, f16::from_le_bytes), shape),
        DType::I32 => Array::new(le!(4, i32::from_le_bytes), shape),
        DType::Bool => Array::new(buf.iter().map(|&b| b != 0).collect::<Vec<bool>>(), shape),
    }
}

/// The tensors of a safetensors file under `path` (`/`-separated), keyed by their path relative
/// to it. Keys may join the tree path with `/` (`params/query/kernel`) or `.`
/// (`params.query.kernel`, `safetensors.flax.save_file` of a flattened dict); both are read.
pub fn safetensors_subtree(bytes: &[u8], path: &str) -> Result<BTreeMap<String, Array>, AttnError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| corrupt("<file>", "a safetensors file", e.to_string()))?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut out = BTreeMap::new();
    for (key, view) in st.tensors() {
        let sep = if key.contains('/') { '/' } else { '.' };
        let segs: Vec<&str> = key.split(sep).collect();
        if segs.len() <= parts.len() || segs[..parts.len()] != parts[..] {
            continue;
        }
        let rel = segs[parts.len()..].join("/");
        let full = join(path.trim_matches('/'), &rel);
        let name = match view.dtype() {
            safetensors::Dtype::F32 => "float32",
            safetensors::Dtype::F64 => "float64",
            safetensors::Dtype::BF16 => "bfloat16",
            safetensors::Dtype::F16 => "float16",
            safetensors::Dtype::I32 => "int32",
            safetensors::Dtype::BOOL => "bool",
            other => {
                return Err(corrupt(
                    &full,
                    "dtype F32, F64, BF16, F16, I32 or BOOL",
                    format!("{other:?}"),
                ));
            }
        };
        out.insert(rel, decode(&full, name, view.shape(), view.data())?);
    }
    if out.is_empty() {
        return Err(corrupt(
            path,
            "tensors under this path (keys joined by `/` or `.`)",
            "none",
        ));
    }
    Ok(out)
}
