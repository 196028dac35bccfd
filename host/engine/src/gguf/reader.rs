//! A strict GGUF (v2, v3) parser over a memory-mapped file.
//!
//! Layout (little-endian throughout):
//!
//! ```text
//! "GGUF"  u32 version  u64 tensor_count  u64 kv_count
//! kv_count × { string key, u32 value_type, value }
//! tensor_count × { string name, u32 n_dims, n_dims × u64 ne, u32 ggml_type, u64 offset }
//! padding to `general.alignment` (default 32)
//! tensor data; each tensor at data_offset + offset
//! ```
//!
//! A string is a u64 byte length and that many UTF-8 bytes; an array is a u32 element type, a u64
//! count and the elements. The file is untrusted: every length, count and offset is checked against
//! the bytes that are actually there before anything is allocated or sliced, so a corrupt or truncated
//! file ends in [`EngineError::Gguf`] naming what was wrong and where, never in a panic or a huge
//! allocation.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::types::GgmlType;
use crate::error::{EngineError, Result};

/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's limit on tensor rank.
pub const MAX_DIMS: usize = 4;
/// Arrays nested deeper than this are rejected (GGUF allows arrays of arrays; real files use none).
const MAX_ARRAY_DEPTH: usize = 4;

const MAGIC: &[u8; 4] = b"GGUF";
/// Up-front reservation for the key and tensor tables; beyond it they grow as entries actually parse.
const RESERVE_CAP: u64 = 4096;

/// A metadata value's on-disk type id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type takes in a file (used to cap counts before allocating).
    fn min_encoded_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,
            Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(MetadataArray),
}

/// A metadata array, stored by element type so that memory stays proportional to the file's bytes
/// (a 49 152-entry `token_type` array is 192 KiB, not 49 152 enums).
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetadataArray>),
}

impl MetadataArray {
    pub fn len(&self) -> usize {
        match self {
            MetadataArray::U8(v) => v.len(),
            MetadataArray::I8(v) => v.len(),
            MetadataArray::U16(v) => v.len(),
            MetadataArray::I16(v) => v.len(),
            MetadataArray::U32(v) => v.len(),
            MetadataArray::I32(v) => v.len(),
            MetadataArray::U64(v) => v.len(),
            MetadataArray::I64(v) => v.len(),
            MetadataArray::F32(v) => v.len(),
            MetadataArray::F64(v) => v.len(),
            MetadataArray::Bool(v) => v.len(),
            MetadataArray::String(v) => v.len(),
            MetadataArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name, for error messages.
    pub fn element_type_name(&self) -> &'static str {
        match self {
            MetadataArray::U8(_) => "u8",
            MetadataArray::I8(_) => "i8",
            MetadataArray::U16(_) => "u16",
            MetadataArray::I16(_) => "i16",
            MetadataArray::U32(_) => "u32",
            MetadataArray::I32(_) => "i32",
            MetadataArray::U64(_) => "u64",
            MetadataArray::I64(_) => "i64",
            MetadataArray::F32(_) => "f32",
            MetadataArray::F64(_) => "f64",
            MetadataArray::Bool(_) => "bool",
            MetadataArray::String(_) => "string",
            MetadataArray::Array(_) => "array",
        }
    }

    /// The elements as signed integers, if this is an integer array whose values all fit in i64.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        fn conv<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            MetadataArray::U8(v) => conv(v, |x| Some(x.into())),
            MetadataArray::I8(v) => conv(v, |x| Some(x.into())),
            MetadataArray::U16(v) => conv(v, |x| Some(x.into())),
            MetadataArray::I16(v) => conv(v, |x| Some(x.into())),
            MetadataArray::U32(v) => conv(v, |x| Some(x.into())),
            MetadataArray::I32(v) => conv(v, |x| Some(x.into())),
            MetadataArray::U64(v) => conv(v, |x| i64::try_from(x).ok()),
            MetadataArray::I64(v) => Some(v.clone()),
            _ => None,
        }
    }
}

impl MetadataValue {
    /// The value as a non-negative integer, whichever integer type the writer chose.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an f64, from either float type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&MetadataArray> {
        match self {
            MetadataValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetadataValue::U8(_) => "u8",
            MetadataValue::I8(_) => "i8",
            MetadataValue::U16(_) => "u16",
            MetadataValue::I16(_) => "i16",
            MetadataValue::U32(_) => "u32",
            MetadataValue::I32(_) => "i32",
            MetadataValue::U64(_) => "u64",
            MetadataValue::I64(_) => "i64",
            MetadataValue::F32(_) => "f32",
            MetadataValue::F64(_) => "f64",
            MetadataValue::Bool(_) => "bool",
            MetadataValue::String(_) => "string",
            MetadataValue::Array(_) => "array",
        }
    }
}

/// One tensor's description. `dims` is in ggml order: `dims[0]` is the fastest-varying axis, so a
/// GGUF `[ne0, ne1]` matrix is a row-major `[ne1, ne0]` matrix in PyTorch / HF terms.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the tensor's bytes from the start of the data section.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The shape in HF / row-major order (GGUF's dims reversed).
    pub fn hf_shape(&self) -> Vec<usize> {
        // Every dim was checked to fit in usize when the file was parsed.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata and tensor table, with the tensor bytes left in the mapping.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    metadata: Vec<(String, MetadataValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses `path`, memory-mapping it. The whole header is validated here, including
    /// that every tensor's bytes lie inside the file.
    ///
    /// The mapping assumes nobody truncates or rewrites the file while it is open (as with any
    /// memory-mapped model file).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        if len < 24 {
            return Err(gguf_err(
                path,
                format!("file is {len} bytes, too short for a GGUF header (24 bytes)"),
            ));
        }
        // SAFETY: the map is read-only and private to this struct; the documented contract is that the
        // file is not modified while open. Every access below is bounds-checked against the map's length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        Self::parse(path.to_path_buf(), Storage::Mapped(mmap))
    }

    /// Parses a GGUF held in memory; `label` names it in error messages.
    pub fn from_bytes(label: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(label.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<Self> {
        let header = parse_header(&path, storage.bytes())?;
        let metadata_index = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path,
            storage,
            version: header.version,
            metadata: header.metadata,
            metadata_index,
            tensors: header.tensors,
            tensor_index,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where tensor data starts, in bytes from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (possibly quantized) bytes of `tensor`.
    pub fn tensor_data(&self, tensor: &TensorInfo) -> Result<&[u8]> {
        let start = self.data_offset.checked_add(tensor.offset);
        let end = start.and_then(|s| s.checked_add(tensor.n_bytes));
        match (start, end) {
            (Some(s), Some(e)) => usize::try_from(s)
                .ok()
                .zip(usize::try_from(e).ok())
                .and_then(|(s, e)| self.storage.bytes().get(s..e))
                .ok_or_else(|| self.error(format!("tensor {} lies outside the file", tensor.name))),
            _ => Err(self.error(format!("tensor {} has an offset that overflows", tensor.name))),
        }
    }

    /// An [`EngineError::Gguf`] about this file.
    pub fn error(&self, message: impl Into<String>) -> EngineError {
        gguf_err(&self.path, message)
    }

    /// A required string value.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?
            .ok_or_else(|| self.error(format!("metadata key {key} is missing")))
    }

    /// An optional string value; present with another type is an error.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", MetadataValue::as_str)
    }

    /// A required non-negative integer value (any integer type).
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?
            .ok_or_else(|| self.error(format!("metadata key {key} is missing")))
    }

    /// An optional non-negative integer value (any integer type).
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", MetadataValue::as_u64)
    }

    /// An optional float value (f32 or f64).
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a float", MetadataValue::as_f64)
    }

    /// An optional bool value.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", MetadataValue::as_bool)
    }

    /// An optional array of strings.
    pub fn opt_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.typed(key, "an array", MetadataValue::as_array)? {
            None => Ok(None),
            Some(MetadataArray::String(v)) => Ok(Some(v)),
            Some(a) => Err(self.error(format!(
                "metadata key {key} is an array of {}, expected an array of strings",
                a.element_type_name()
            ))),
        }
    }

    /// An optional array of integers (any integer element type).
    pub fn opt_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.typed(key, "an array", MetadataValue::as_array)? {
            None => Ok(None),
            Some(a) => a.to_i64_vec().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata key {key} is an array of {}, expected an array of integers",
                    a.element_type_name()
                ))
            }),
        }
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'a MetadataValue) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => convert(v).map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata key {key} is a {}, expected {expected}",
                    v.type_name()
                ))
            }),
        }
    }
}

fn gguf_err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Gguf {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

struct Header {
    version: u32,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let mut r = Reader { path, bytes, pos: 0 };
    let magic = r.take(4, "magic")?;
    if magic != MAGIC {
        return Err(r.err_at(0, format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
    }
    let version = r.u32("version")?;
    match version {
        2 | 3 => {}
        1 => return Err(r.err_at(4, "GGUF version 1 is not supported (re-convert with a newer llama.cpp)")),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(r.err_at(4, "big-endian GGUF files are not supported"));
        }
        v => return Err(r.err_at(4, format!("unsupported GGUF version {v} (supported: 2, 3)"))),
    }
    let tensor_count = r.u64("tensor count")?;
    let kv_count = r.u64("metadata count")?;

    // Each key-value pair takes at least 13 bytes (8-byte key length, 4-byte type, 1-byte value) and
    // each tensor info at least 24 (8-byte name length, 4-byte rank, 4-byte type, 8-byte offset): cap
    // both counts by what the file can hold before reserving anything.
    r.check_count(kv_count, 13, "metadata count")?;
    let mut metadata: Vec<(String, MetadataValue)> = Vec::with_capacity(kv_count.min(RESERVE_CAP) as usize);
    let mut seen_keys: HashSet<String> = HashSet::with_capacity(kv_count.min(RESERVE_CAP) as usize);
    for i in 0..kv_count {
        let at = r.pos;
        let key = r.string(&format!("metadata key #{i}"))?;
        let type_id = r.u32(&format!("type of metadata key {key}"))?;
        let value = r.value(type_id, &key, 0)?;
        if !seen_keys.insert(key.clone()) {
            return Err(r.err_at(at, format!("duplicate metadata key {key}")));
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetadataValue::U32(a))) if *a > 0 && a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(gguf_err(
                path,
                format!("general.alignment must be a power-of-two u32, found {v:?}"),
            ));
        }
    };

    r.check_count(tensor_count, 24, "tensor count")?;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count.min(RESERVE_CAP) as usize);
    let mut seen_tensors: HashSet<String> = HashSet::with_capacity(tensor_count.min(RESERVE_CAP) as usize);
    for i in 0..tensor_count {
        let at = r.pos;
        let name = r.string(&format!("name of tensor #{i}"))?;
        if !seen_tensors.insert(name.clone()) {
            return Err(r.err_at(at, format!("duplicate tensor name {name}")));
        }
        let n_dims = r.u32(&format!("rank of tensor {name}"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(r.err_at(
                at,
                format!("tensor {name} has {n_dims} dimensions (ggml allows at most {MAX_DIMS})"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let dim = r.u64(&format!("dimension {d} of tensor {name}"))?;
            if usize::try_from(dim).is_err() {
                return Err(r.err_at(at, format!("tensor {name}: dimension {dim} does not fit in memory")));
            }
            dims.push(dim);
        }
        let type_id = r.u32(&format!("type of tensor {name}"))?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| r.err_at(at, format!("tensor {name} has unknown ggml type id {type_id}")))?;
        let offset = r.u64(&format!("offset of tensor {name}"))?;

        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                r.err_at(
                    at,
                    format!("tensor {name} has an element count that overflows ({dims:?})"),
                )
            })?;
        let first = dims.first().copied().unwrap_or(1);
        if first % ggml_type.block_size() as u64 != 0 {
            return Err(r.err_at(
                at,
                format!(
                    "tensor {name}: first dimension {first} is not a multiple of the {ggml_type} block size {}",
                    ggml_type.block_size()
                ),
            ));
        }
        let n_bytes = ggml_type
            .bytes_for(n_elements)
            .ok_or_else(|| r.err_at(at, format!("tensor {name}: byte size overflows")))?;
        if offset % alignment != 0 {
            return Err(r.err_at(
                at,
                format!("tensor {name}: offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        });
    }

    let file_len = bytes.len() as u64;
    let data_offset = align_up(r.pos as u64, alignment)
        .filter(|&o| o <= file_len)
        .ok_or_else(|| {
            gguf_err(
                path,
                format!("file ends ({file_len} bytes) before its tensor data section"),
            )
        })?;
    let data_len = file_len - data_offset;

    // Every tensor must lie inside the data section, and no two may overlap.
    let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let end = t.offset.checked_add(t.n_bytes).filter(|&e| e <= data_len).ok_or_else(|| {
            gguf_err(
                path,
                format!(
                    "tensor {} ({} bytes at data offset {}) runs past the end of the file (data section is {data_len} bytes) — truncated download?",
                    t.name, t.n_bytes, t.offset
                ),
            )
        })?;
        spans.push((t.offset, end, &t.name));
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.0 < a.1 {
            return Err(gguf_err(path, format!("tensors {} and {} overlap", a.2, b.2)));
        }
    }

    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    let rem = x % alignment;
    if rem == 0 {
        Some(x)
    } else {
        x.checked_add(alignment - rem)
    }
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn err_at(&self, at: usize, message: impl Into<String>) -> EngineError {
        gguf_err(self.path, format!("{} (at byte {at})", message.into()))
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err_at(
                self.pos,
                format!(
                    "truncated: {what} needs {n} bytes but only {} remain (file is {} bytes)",
                    self.remaining(),
                    self.bytes.len()
                ),
            ));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let slice = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Fails unless `count` items of at least `min_size` bytes each fit in what is left of the file.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        let fits = count.checked_mul(min_size).is_some_and(|n| n <= self.remaining());
        if fits {
            Ok(())
        } else {
            Err(self.err_at(
                self.pos,
                format!(
                    "{what} {count} cannot fit in the {} bytes left of the file (corrupt header?)",
                    self.remaining()
                ),
            ))
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(&format!("length of {what}"))?;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|e| self.err_at(at, format!("{what} is not valid UTF-8: {e}")))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<MetadataValue> {
        let at = self.pos;
        let ty = ValueType::from_id(type_id)
            .ok_or_else(|| self.err_at(at, format!("metadata key {key} has unknown value type {type_id}")))?;
        let what = format!("value of metadata key {key}");
        Ok(match ty {
            ValueType::U8 => MetadataValue::U8(u8::from_le_bytes(self.array(&what)?)),
            ValueType::I8 => MetadataValue::I8(i8::from_le_bytes(self.array(&what)?)),
            ValueType::U16 => MetadataValue::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => MetadataValue::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => MetadataValue::U32(u32::from_le_bytes(self.array(&what)?)),
            ValueType::I32 => MetadataValue::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::U64 => MetadataValue::U64(u64::from_le_bytes(self.array(&what)?)),
            ValueType::I64 => MetadataValue::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => MetadataValue::F32(f32::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => MetadataValue::F64(f64::from_le_bytes(self.array(&what)?)),
            ValueType::Bool => MetadataValue::Bool(self.bool(key)?),
            ValueType::String => MetadataValue::String(self.string(&what)?),
            ValueType::Array => MetadataValue::Array(self.array_value(key, depth)?),
        })
    }

    fn bool(&mut self, key: &str) -> Result<bool> {
        let at = self.pos;
        match u8::from_le_bytes(self.array(&format!("value of metadata key {key}"))?) {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err_at(at, format!("metadata key {key}: bool byte is {b}, expected 0 or 1"))),
        }
    }

    /// An array's element type, count and elements. The count is checked against the bytes left
    /// before anything is reserved, so a corrupt count costs an error, not memory.
    fn array_value(&mut self, key: &str, depth: usize) -> Result<MetadataArray> {
        let at = self.pos;
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err_at(
                at,
                format!("metadata key {key}: arrays nested deeper than {MAX_ARRAY_DEPTH}"),
            ));
        }
        let elem_id = self.u32(&format!("element type of array {key}"))?;
        let elem_ty = ValueType::from_id(elem_id)
            .ok_or_else(|| self.err_at(at, format!("metadata key {key}: unknown array element type {elem_id}")))?;
        let count = self.u64(&format!("length of array {key}"))?;
        self.check_count(count, elem_ty.min_encoded_size(), &format!("length of array {key}:"))?;
        let n = count as usize;
        let what = format!("element of array {key}");
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let mut v: Vec<$t> = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(<$t>::from_le_bytes(self.array(&what)?));
                }
                MetadataArray::$variant(v)
            }};
        }
        Ok(match elem_ty {
            ValueType::U8 => fixed!(U8, u8),
            ValueType::I8 => fixed!(I8, i8),
            ValueType::U16 => fixed!(U16, u16),
            ValueType::I16 => fixed!(I16, i16),
            ValueType::U32 => fixed!(U32, u32),
            ValueType::I32 => fixed!(I32, i32),
            ValueType::U64 => fixed!(U64, u64),
            ValueType::I64 => fixed!(I64, i64),
            ValueType::F32 => fixed!(F32, f32),
            ValueType::F64 => fixed!(F64, f64),
            ValueType::Bool => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(key)?);
                }
                MetadataArray::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string(&what)?);
                }
                MetadataArray::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                MetadataArray::Array(v)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::writer::GgufWriter;

    fn small_file() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.add_string("general.architecture", "llama");
        w.add_u32("llama.block_count", 1);
        w.add_f32("llama.rope.freq_base", 10000.0);
        w.add_bool("tokenizer.ggml.add_bos_token", true);
        w.add_string_array("tokenizer.ggml.tokens", &["a", "b", "ab"]);
        w.add_i32_array("tokenizer.ggml.token_type", &[1, 1, 3]);
        w.add_f32_tensor("t.weight", &[4, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        w.add_f32_tensor("n.weight", &[3], &[1.0, 2.0, 3.0]);
        w.to_bytes()
    }

    #[test]
    fn parses_a_valid_file() {
        let f = GgufFile::from_bytes("small.gguf", small_file()).expect("valid file");
        assert_eq!(f.version(), 3);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.data_offset() % 32, 0);
        assert_eq!(f.require_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.require_u64("llama.block_count").unwrap(), 1);
        assert_eq!(f.opt_f64("llama.rope.freq_base").unwrap(), Some(10000.0));
        assert_eq!(f.opt_bool("tokenizer.ggml.add_bos_token").unwrap(), Some(true));
        assert_eq!(
            f.opt_str_array("tokenizer.ggml.tokens").unwrap().unwrap(),
            ["a", "b", "ab"]
        );
        assert_eq!(
            f.opt_i64_array("tokenizer.ggml.token_type").unwrap().unwrap(),
            vec![1, 1, 3]
        );
        let t = f.tensor("t.weight").unwrap();
        assert_eq!(t.dims, vec![4, 2]);
        assert_eq!(t.hf_shape(), vec![2, 4]);
        assert_eq!(t.n_bytes, 32);
        let data = f.tensor_data(t).unwrap();
        assert_eq!(f32::from_le_bytes(data[4..8].try_into().unwrap()), 1.0);
        let n = f.tensor("n.weight").unwrap();
        assert_eq!(n.offset % 32, 0);
        assert_eq!(
            f32::from_le_bytes(f.tensor_data(n).unwrap()[8..12].try_into().unwrap()),
            3.0
        );
    }

    #[test]
    fn wrong_types_are_clear_errors() {
        let f = GgufFile::from_bytes("small.gguf", small_file()).unwrap();
        let e = f.require_u64("general.architecture").unwrap_err().to_string();
        assert!(
            e.contains("general.architecture is a string, expected a non-negative integer"),
            "{e}"
        );
        let e = f.require_str("missing.key").unwrap_err().to_string();
        assert!(e.contains("missing.key is missing"), "{e}");
    }

    fn parse_err(bytes: Vec<u8>) -> String {
        GgufFile::from_bytes("bad.gguf", bytes)
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn rejects_bad_magic_and_versions() {
        let mut b = small_file();
        b[0] = b'X';
        assert!(parse_err(b).contains("not a GGUF file"));
        let mut b = small_file();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(parse_err(b).contains("version 1"));
        let mut b = small_file();
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(parse_err(b).contains("big-endian"));
        let mut b = small_file();
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert!(parse_err(b).contains("unsupported GGUF version 7"));
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut b = small_file();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_err(b).contains("tensor count"));
        let mut b = small_file();
        b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse_err(b).contains("metadata count"));
    }

    #[test]
    fn truncated_tensor_data_names_the_tensor() {
        let mut b = small_file();
        b.truncate(b.len() - 4);
        let e = parse_err(b);
        assert!(e.contains("n.weight") && e.contains("past the end"), "{e}");
    }

    #[test]
    fn huge_array_length_is_rejected() {
        let mut w = GgufWriter::new();
        w.add_string_array("k", &["x"]);
        let mut b = w.to_bytes();
        // header 24 + key (8 + 1) + type 4 + elem type 4 → the array length field.
        let at = 24 + 9 + 4 + 4;
        b[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(parse_err(b).contains("length of array k"));
    }

    #[test]
    fn duplicate_keys_and_tensors_are_rejected() {
        let mut w = GgufWriter::new();
        w.add_u32("a", 1);
        w.add_u32("a", 2);
        assert!(parse_err(w.to_bytes()).contains("duplicate metadata key a"));
        let mut w = GgufWriter::new();
        w.add_f32_tensor("t", &[1], &[1.0]);
        w.add_f32_tensor("t", &[1], &[1.0]);
        assert!(parse_err(w.to_bytes()).contains("duplicate tensor name t"));
    }

    #[test]
    fn bad_alignment_and_misaligned_offsets_are_rejected() {
        let mut w = GgufWriter::new();
        w.add_u32("general.alignment", 24);
        assert!(parse_err(w.to_bytes()).contains("power-of-two"));
        let mut w = GgufWriter::new();
        w.add_u32("general.alignment", 64);
        w.add_f32_tensor("a", &[3], &[1.0, 2.0, 3.0]);
        w.add_f32_tensor("b", &[3], &[1.0, 2.0, 3.0]);
        let f = GgufFile::from_bytes("ok.gguf", w.to_bytes()).unwrap();
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.tensor("b").unwrap().offset, 64);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = small_file();
        for len in 0..full.len() {
            let r = GgufFile::from_bytes("t.gguf", full[..len].to_vec());
            assert!(r.is_err(), "prefix of {len} bytes parsed");
        }
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

            #[test]
            fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = GgufFile::from_bytes("fuzz.gguf", bytes);
            }

            #[test]
            fn random_bytes_after_a_valid_header_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
                let mut bytes = b"GGUF".to_vec();
                bytes.extend_from_slice(&3u32.to_le_bytes());
                bytes.extend_from_slice(&tail);
                let _ = GgufFile::from_bytes("fuzz.gguf", bytes);
            }

            #[test]
            fn mutated_valid_files_never_panic(
                edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                cut in any::<prop::sample::Index>(),
            ) {
                let mut bytes = crate::gguf::writer::tests_support::tiny_llama_gguf();
                for (at, value) in edits {
                    let i = at.index(bytes.len());
                    bytes[i] = value;
                }
                if cut.index(4) == 0 {
                    let keep = cut.index(bytes.len());
                    bytes.truncate(keep);
                }
                if let Ok(file) = GgufFile::from_bytes("fuzz.gguf", bytes) {
                    // Whatever parsed must be safe to use all the way down.
                    for t in file.tensors() {
                        if let Ok(data) = file.tensor_data(t) {
                            let _ = crate::gguf::dequant::dequantize(t.ggml_type, data, t.n_elements);
                        }
                    }
                    let _ = crate::gguf::tokenizer::GgufVocab::from_gguf(&file)
                        .and_then(|v| v.tokenizer_json());
                    let _ = crate::gguf::import::LlamaParams::from_gguf(&file);
                }
            }
        }
    }
}
