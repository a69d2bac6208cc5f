//! A small, strict reader of numpy `.npy` files for `vcid compute`.
//!
//! Owns: parsing the `.npy` header (format versions 1.0, 2.0 and 3.0; the
//! `descr`, `fortran_order` and `shape` entries of its Python-literal dict),
//! streaming a 2-D float32/float64 C-order feature matrix a few rows at a
//! time into `ndarray::Array2<f64>`, and reading a 1-D integer label vector.
//! Every error names the file, what was expected and what was found.
//!
//! Must not: compute any statistic, hold the whole feature matrix in memory,
//! or accept a file it cannot read exactly (no guessing of dtypes, no
//! silently ignored trailing bytes). It reads only what vcid needs; other
//! dtypes and layouts are refused with a clear message rather than converted.

use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ndarray::Array2;

/// The first six bytes of every `.npy` file.
const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Upper bound on the header length we are willing to read; numpy's own
/// limit for untrusted files is 10,000 bytes, real headers are ~128 bytes.
const MAX_HEADER_LEN: usize = 1 << 20;

/// Why a `.npy` file could not be read. Each variant carries the file path
/// so a message can always be traced back to the file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// Opening, reading or seeking failed at the operating-system level.
    #[error("{path}: cannot read the file: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The header does not follow the `.npy` format.
    #[error("{path}: not a valid .npy file: expected {expected}, found {found}")]
    Format {
        path: PathBuf,
        expected: String,
        found: String,
    },
    /// A well-formed header describes an array vcid does not read.
    #[error("{path}: unsupported array: expected {expected}, found {found}")]
    Unsupported {
        path: PathBuf,
        expected: String,
        found: String,
    },
    /// The data section is shorter or longer than the header says.
    #[error("{path}: wrong data length: expected {expected} bytes after the {header} byte header (shape {shape}), found {found}")]
    DataLength {
        path: PathBuf,
        header: u64,
        shape: String,
        expected: u64,
        found: u64,
    },
    /// A label is negative or does not fit the label type vcid uses (u32).
    #[error("{path}: label at index {index}: expected an integer in [0, {max}], found {found}")]
    LabelRange {
        path: PathBuf,
        index: u64,
        max: u64,
        found: i128,
    },
}

/// Element type of a feature matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    /// `<f4`
    F32,
    /// `<f8`
    F64,
}

impl FloatDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F64 => 8,
        }
    }
}

impl fmt::Display for FloatDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FloatDtype::F32 => "float32",
            FloatDtype::F64 => "float64",
        })
    }
}

/// The parsed header of a `.npy` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    /// Format version (major, minor).
    pub version: (u8, u8),
    /// The dtype string, e.g. `<f4`.
    pub descr: String,
    /// Whether the data is stored in Fortran (column-major) order.
    pub fortran_order: bool,
    /// The array shape.
    pub shape: Vec<u64>,
    /// Byte offset of the first data byte (magic + version + length + header).
    pub data_offset: u64,
}

impl NpyHeader {
    /// Number of elements, or `None` if it overflows u64.
    fn element_count(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &n| acc.checked_mul(n))
    }
}

/// Formats a shape the way numpy prints it: `(3,)`, `(100, 4)`.
fn shape_string(shape: &[u64]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(|n| n.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    }
}

fn format_err(path: &Path, expected: impl Into<String>, found: impl Into<String>) -> NpyError {
    NpyError::Format {
        path: path.to_path_buf(),
        expected: expected.into(),
        found: found.into(),
    }
}

fn unsupported(path: &Path, expected: impl Into<String>, found: impl Into<String>) -> NpyError {
    NpyError::Unsupported {
        path: path.to_path_buf(),
        expected: expected.into(),
        found: found.into(),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> NpyError {
    NpyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads and parses the header from the start of `reader`; leaves the reader
/// positioned at the first data byte.
pub fn read_header<R: Read>(reader: &mut R, path: &Path) -> Result<NpyHeader, NpyError> {
    let mut preamble = [0u8; 8];
    read_exact_or(reader, &mut preamble, path, "the 8-byte .npy preamble")?;
    if &preamble[..6] != MAGIC {
        return Err(format_err(
            path,
            "the magic string \\x93NUMPY",
            escape_bytes(&preamble[..6]),
        ));
    }
    let version = (preamble[6], preamble[7]);
    let (header_len, len_bytes) = match version.0 {
        1 => {
            let mut b = [0u8; 2];
            read_exact_or(reader, &mut b, path, "the 2-byte header length")?;
            (u16::from_le_bytes(b) as usize, 2u64)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            read_exact_or(reader, &mut b, path, "the 4-byte header length")?;
            (u32::from_le_bytes(b) as usize, 4u64)
        }
        _ => {
            return Err(format_err(
                path,
                "format version 1.0, 2.0 or 3.0",
                format!("version {}.{}", version.0, version.1),
            ))
        }
    };
    if version.1 != 0 {
        return Err(format_err(
            path,
            "format version 1.0, 2.0 or 3.0",
            format!("version {}.{}", version.0, version.1),
        ));
    }
    if header_len > MAX_HEADER_LEN {
        return Err(format_err(
            path,
            format!("a header of at most {MAX_HEADER_LEN} bytes"),
            format!("{header_len} bytes"),
        ));
    }
    let mut raw = vec![0u8; header_len];
    read_exact_or(reader, &mut raw, path, "the header dictionary")?;
    // Versions 1 and 2 are latin-1, version 3 is UTF-8. Every header numpy
    // writes for the dtypes we accept is ASCII, so decoding latin-1 bytes
    // one-to-one to chars is exact for both.
    let text: String = if version.0 == 3 {
        String::from_utf8(raw)
            .map_err(|_| format_err(path, "a UTF-8 header (version 3.0)", "invalid UTF-8"))?
    } else {
        raw.iter().map(|&b| b as char).collect()
    };
    let data_offset = 8 + len_bytes + header_len as u64;
    let dict = parse_header_dict(&text).map_err(|msg| {
        format_err(
            path,
            "a header dict like {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}",
            format!("{msg} in {:?}", text.trim_end()),
        )
    })?;
    let mut descr = None;
    let mut fortran_order = None;
    let mut shape = None;
    for (key, value) in dict {
        match key.as_str() {
            "descr" => match value {
                PyValue::Str(s) => descr = Some(s),
                other => {
                    return Err(unsupported(
                        path,
                        "a simple dtype string for 'descr' (e.g. '<f4')",
                        format!("{other}"),
                    ))
                }
            },
            "fortran_order" => match value {
                PyValue::Bool(b) => fortran_order = Some(b),
                other => {
                    return Err(format_err(
                        path,
                        "True or False for 'fortran_order'",
                        format!("{other}"),
                    ))
                }
            },
            "shape" => match value {
                PyValue::Tuple(items) => {
                    let mut dims = Vec::with_capacity(items.len());
                    for item in items {
                        match item {
                            PyValue::Int(n) if n >= 0 && n <= u64::MAX as i128 => {
                                dims.push(n as u64)
                            }
                            other => {
                                return Err(format_err(
                                    path,
                                    "non-negative integers in 'shape'",
                                    format!("{other}"),
                                ))
                            }
                        }
                    }
                    shape = Some(dims);
                }
                other => return Err(format_err(path, "a tuple for 'shape'", format!("{other}"))),
            },
            other => {
                return Err(format_err(
                    path,
                    "only the keys 'descr', 'fortran_order' and 'shape'",
                    format!("key {other:?}"),
                ))
            }
        }
    }
    let missing = |key: &str| format_err(path, format!("the key '{key}' in the header"), "none");
    Ok(NpyHeader {
        version,
        descr: descr.ok_or_else(|| missing("descr"))?,
        fortran_order: fortran_order.ok_or_else(|| missing("fortran_order"))?,
        shape: shape.ok_or_else(|| missing("shape"))?,
        data_offset,
    })
}

fn read_exact_or<R: Read>(
    reader: &mut R,
    buf: &mut [u8],
    path: &Path,
    what: &str,
) -> Result<(), NpyError> {
    reader.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            format_err(path, what.to_string(), "end of file")
        } else {
            io_err(path, e)
        }
    })
}

fn escape_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

/// The subset of Python literals that appear in `.npy` headers.
#[derive(Clone, Debug, PartialEq)]
enum PyValue {
    Str(String),
    Int(i128),
    Bool(bool),
    None,
    Tuple(Vec<PyValue>),
    List(Vec<PyValue>),
    Dict(Vec<(String, PyValue)>),
}

impl fmt::Display for PyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PyValue::Str(s) => write!(f, "'{s}'"),
            PyValue::Int(n) => write!(f, "{n}"),
            PyValue::Bool(true) => f.write_str("True"),
            PyValue::Bool(false) => f.write_str("False"),
            PyValue::None => f.write_str("None"),
            PyValue::Tuple(items) | PyValue::List(items) => {
                let (open, close) = if matches!(self, PyValue::Tuple(_)) {
                    ('(', ')')
                } else {
                    ('[', ']')
                };
                write!(f, "{open}")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                if items.len() == 1 && open == '(' {
                    f.write_str(",")?;
                }
                write!(f, "{close}")
            }
            PyValue::Dict(entries) => {
                f.write_str("{")?;
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "'{k}': {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// A recursive-descent parser for the header dict. Errors are short
/// descriptions of what was found at which character offset.
struct Parser {
    chars: Vec<char>,
    pos: usize,
}

/// Nesting limit so a hostile header cannot overflow the stack.
const MAX_DEPTH: usize = 16;

fn parse_header_dict(text: &str) -> Result<Vec<(String, PyValue)>, String> {
    let mut p = Parser {
        chars: text.chars().collect(),
        pos: 0,
    };
    let value = p.value(0)?;
    p.skip_ws();
    if p.pos != p.chars.len() {
        return Err(format!(
            "unexpected {:?} at offset {}",
            p.chars[p.pos], p.pos
        ));
    }
    match value {
        PyValue::Dict(entries) => Ok(entries),
        other => Err(format!("{other} instead of a dict")),
    }
}

impl Parser {
    fn skip_ws(&mut self) {
        while self.pos < self.chars.len() && self.chars[self.pos].is_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_ws();
        self.chars.get(self.pos).copied()
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        match self.peek() {
            Some(found) if found == c => {
                self.pos += 1;
                Ok(())
            }
            Some(found) => Err(format!(
                "{found:?} at offset {} where {c:?} was expected",
                self.pos
            )),
            None => Err(format!("end of header where {c:?} was expected")),
        }
    }

    fn value(&mut self, depth: usize) -> Result<PyValue, String> {
        if depth > MAX_DEPTH {
            return Err(format!("nesting deeper than {MAX_DEPTH}"));
        }
        match self.peek() {
            None => Err("end of header where a value was expected".into()),
            Some('{') => {
                self.pos += 1;
                let mut entries = Vec::new();
                loop {
                    if self.peek() == Some('}') {
                        self.pos += 1;
                        return Ok(PyValue::Dict(entries));
                    }
                    let key = match self.value(depth + 1)? {
                        PyValue::Str(s) => s,
                        other => return Err(format!("dict key {other} is not a string")),
                    };
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(format!("duplicate key '{key}'"));
                    }
                    self.expect(':')?;
                    let v = self.value(depth + 1)?;
                    entries.push((key, v));
                    match self.peek() {
                        Some(',') => self.pos += 1,
                        Some('}') => {}
                        Some(c) => {
                            return Err(format!("{c:?} at offset {} inside the dict", self.pos))
                        }
                        None => return Err("end of header inside the dict".into()),
                    }
                }
            }
            Some(open @ ('(' | '[')) => {
                self.pos += 1;
                let close = if open == '(' { ')' } else { ']' };
                let mut items = Vec::new();
                let mut saw_comma = false;
                loop {
                    if self.peek() == Some(close) {
                        self.pos += 1;
                        // `(5)` is the integer 5 in Python, not a tuple.
                        if open == '(' && items.len() == 1 && !saw_comma {
                            return Ok(items.pop().unwrap_or(PyValue::None));
                        }
                        return Ok(if open == '(' {
                            PyValue::Tuple(items)
                        } else {
                            PyValue::List(items)
                        });
                    }
                    items.push(self.value(depth + 1)?);
                    match self.peek() {
                        Some(',') => {
                            self.pos += 1;
                            saw_comma = true;
                        }
                        Some(c) if c == close => {}
                        Some(c) => {
                            return Err(format!("{c:?} at offset {} inside a sequence", self.pos))
                        }
                        None => return Err("end of header inside a sequence".into()),
                    }
                }
            }
            Some(q @ ('\'' | '"')) => {
                self.pos += 1;
                let mut s = String::new();
                loop {
                    match self.chars.get(self.pos).copied() {
                        None => return Err("end of header inside a string".into()),
                        Some('\\') => {
                            // dtype strings never need escapes; keep the
                            // escaped char verbatim rather than interpreting.
                            match self.chars.get(self.pos + 1).copied() {
                                Some(c) => s.push(c),
                                None => return Err("end of header inside a string".into()),
                            }
                            self.pos += 2;
                        }
                        Some(c) if c == q => {
                            self.pos += 1;
                            return Ok(PyValue::Str(s));
                        }
                        Some(c) => {
                            s.push(c);
                            self.pos += 1;
                        }
                    }
                }
            }
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' => {
                let start = self.pos;
                self.pos += 1;
                while self.pos < self.chars.len() && self.chars[self.pos].is_ascii_digit() {
                    self.pos += 1;
                }
                let digits: String = self.chars[start..self.pos].iter().collect();
                // Python 2 wrote long integers as `3L`.
                if self.chars.get(self.pos) == Some(&'L') {
                    self.pos += 1;
                }
                digits
                    .parse::<i128>()
                    .map(PyValue::Int)
                    .map_err(|_| format!("bad integer {digits:?}"))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.pos;
                while self.pos < self.chars.len()
                    && (self.chars[self.pos].is_ascii_alphanumeric() || self.chars[self.pos] == '_')
                {
                    self.pos += 1;
                }
                let word: String = self.chars[start..self.pos].iter().collect();
                match word.as_str() {
                    "True" => Ok(PyValue::Bool(true)),
                    "False" => Ok(PyValue::Bool(false)),
                    "None" => Ok(PyValue::None),
                    _ => Err(format!("unknown name {word:?}")),
                }
            }
            Some(c) => Err(format!("unexpected {c:?} at offset {}", self.pos)),
        }
    }
}

/// Opens `path` and parses its header. Returns the file length too, so the
/// caller can check the data length once it has validated the dtype (a
/// wrong dtype is the more useful message when both are wrong).
fn open_header(path: &Path) -> Result<(BufReader<File>, NpyHeader, u64), NpyError> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();
    // A large buffer: features are read in multi-megabyte chunks anyway, and
    // the header read must not trigger many small syscalls either.
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let header = read_header(&mut reader, path)?;
    Ok((reader, header, file_len))
}

/// Item size of a descr we understand (float or integer), for the length check.
fn descr_item_size(descr: &str) -> Option<u64> {
    let b = descr.as_bytes();
    if b.len() < 3 {
        return None;
    }
    if !matches!(b[1], b'f' | b'i' | b'u') {
        return None;
    }
    descr[2..]
        .parse::<u64>()
        .ok()
        .filter(|n| matches!(n, 1 | 2 | 4 | 8))
}

/// Verifies the data section has exactly the size the header promises.
fn check_len(path: &Path, file_len: u64, h: &NpyHeader) -> Result<(), NpyError> {
    let Some(item) = descr_item_size(&h.descr) else {
        return Ok(());
    };
    let found = file_len.saturating_sub(h.data_offset);
    let expected = h.element_count().and_then(|n| n.checked_mul(item));
    match expected {
        Some(expected) if expected == found => Ok(()),
        Some(expected) => Err(NpyError::DataLength {
            path: path.to_path_buf(),
            header: h.data_offset,
            shape: shape_string(&h.shape),
            expected,
            found,
        }),
        None => Err(format_err(
            path,
            "a shape whose byte size fits in 64 bits",
            shape_string(&h.shape),
        )),
    }
}

/// Streams a 2-D float32/float64 C-order feature matrix row block by row block.
#[derive(Debug)]
pub struct FeatureReader {
    path: PathBuf,
    reader: BufReader<File>,
    dtype: FloatDtype,
    rows: usize,
    cols: usize,
    next_row: usize,
    data_offset: u64,
    raw: Vec<u8>,
}

impl FeatureReader {
    /// Opens a feature file and validates its header and length. Reads no
    /// data yet.
    pub fn open(path: impl AsRef<Path>) -> Result<FeatureReader, NpyError> {
        let path = path.as_ref();
        let (reader, header, file_len) = open_header(path)?;
        let dtype = match header.descr.as_str() {
            "<f4" => FloatDtype::F32,
            "<f8" => FloatDtype::F64,
            other => {
                return Err(unsupported(
                    path,
                    "dtype '<f4' (float32) or '<f8' (float64) for features",
                    format!("dtype '{other}'"),
                ))
            }
        };
        if header.shape.len() != 2 {
            return Err(unsupported(
                path,
                "a 2-D feature array (rows, feature_dim)",
                format!(
                    "{}-D array of shape {}",
                    header.shape.len(),
                    shape_string(&header.shape)
                ),
            ));
        }
        if header.fortran_order && header.shape[0] > 1 && header.shape[1] > 1 {
            return Err(unsupported(
                path,
                "C (row-major) order, fortran_order False (save np.ascontiguousarray(x))",
                "fortran_order True",
            ));
        }
        check_len(path, file_len, &header)?;
        let to_usize = |n: u64| {
            usize::try_from(n).map_err(|_| {
                unsupported(
                    path,
                    "a shape that fits in memory addresses",
                    shape_string(&header.shape),
                )
            })
        };
        Ok(FeatureReader {
            path: path.to_path_buf(),
            reader,
            dtype,
            rows: to_usize(header.shape[0])?,
            cols: to_usize(header.shape[1])?,
            next_row: 0,
            data_offset: header.data_offset,
            raw: Vec::new(),
        })
    }

    /// The file this reader reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Element type on disk.
    pub fn dtype(&self) -> FloatDtype {
        self.dtype
    }

    /// Number of rows in the file.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (the feature dimension).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Index of the next row [`read_rows`](Self::read_rows) will return.
    pub fn position(&self) -> usize {
        self.next_row
    }

    /// Reads up to `max_rows` rows (at least one when `max_rows > 0`),
    /// converted to f64; `None` once all rows were read.
    pub fn read_rows(&mut self, max_rows: usize) -> Result<Option<Array2<f64>>, NpyError> {
        let take = max_rows.min(self.rows - self.next_row);
        if take == 0 {
            return Ok(None);
        }
        let mut out = Array2::<f64>::zeros((take, self.cols));
        self.read_into(&mut out)?;
        Ok(Some(out))
    }

    /// Fills `out` (shape `(r, cols)`, r ≤ remaining rows) with the next r
    /// rows, so a caller can reuse one buffer for the whole file.
    pub fn read_into(&mut self, out: &mut Array2<f64>) -> Result<(), NpyError> {
        let (take, cols) = out.dim();
        if cols != self.cols || take > self.rows - self.next_row {
            return Err(unsupported(
                &self.path,
                format!(
                    "a buffer of at most {} rows x {} columns",
                    self.rows - self.next_row,
                    self.cols
                ),
                format!("{take} x {cols}"),
            ));
        }
        let n_bytes = take * cols * self.dtype.size();
        self.raw.resize(n_bytes, 0);
        self.reader.read_exact(&mut self.raw).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                // The length was checked at open, so the file shrank since.
                format_err(
                    &self.path,
                    format!("{n_bytes} more bytes of data at row {}", self.next_row),
                    "end of file (was the file truncated while reading?)",
                )
            } else {
                io_err(&self.path, e)
            }
        })?;
        // `out` is freshly allocated or caller-owned in standard layout; fall
        // back to an element iterator if not.
        match (out.as_slice_mut(), self.dtype) {
            (Some(dst), FloatDtype::F32) => {
                for (d, s) in dst.iter_mut().zip(self.raw.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]) as f64;
                }
            }
            (Some(dst), FloatDtype::F64) => {
                for (d, s) in dst.iter_mut().zip(self.raw.chunks_exact(8)) {
                    *d = f64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
                }
            }
            (None, dtype) => {
                let size = dtype.size();
                for (d, s) in out.iter_mut().zip(self.raw.chunks_exact(size)) {
                    *d = match dtype {
                        FloatDtype::F32 => f32::from_le_bytes([s[0], s[1], s[2], s[3]]) as f64,
                        FloatDtype::F64 => {
                            f64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
                        }
                    };
                }
            }
        }
        self.next_row += take;
        Ok(())
    }

    /// Goes back to the first row.
    pub fn rewind(&mut self) -> Result<(), NpyError> {
        self.reader
            .seek(SeekFrom::Start(self.data_offset))
            .map_err(|e| io_err(&self.path, e))?;
        self.next_row = 0;
        Ok(())
    }
}

/// Integer element type of a label file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IntDtype {
    I(usize),
    U(usize),
}

/// Reads a 1-D integer label file (`i1`..`i8`, `u1`..`u8`, little-endian or
/// `|`) into u32 labels. Negative labels and labels above `u32::MAX` are
/// errors naming the index.
pub fn read_labels(path: impl AsRef<Path>) -> Result<Vec<u32>, NpyError> {
    let path = path.as_ref();
    let (mut reader, header, file_len) = open_header(path)?;
    let b = header.descr.as_bytes();
    let dtype = if b.len() == 3 && (b[0] == b'<' || b[0] == b'|') {
        let size = (b[2] as char).to_digit(10).map(|n| n as usize);
        match (b[1], size) {
            // `<` is only meaningful with more than one byte; numpy writes
            // `|` for single bytes but `<i1` parses too, so accept both.
            (b'i', Some(n @ (1 | 2 | 4 | 8))) => Some(IntDtype::I(n)),
            (b'u', Some(n @ (1 | 2 | 4 | 8))) => Some(IntDtype::U(n)),
            _ => None,
        }
    } else {
        None
    };
    let Some(dtype) = dtype else {
        return Err(unsupported(
            path,
            "an integer dtype for labels (i1, i2, i4, i8, u1, u2, u4, u8; little-endian)",
            format!("dtype '{}'", header.descr),
        ));
    };
    if header.shape.len() != 1 {
        return Err(unsupported(
            path,
            "a 1-D label array",
            format!(
                "{}-D array of shape {}",
                header.shape.len(),
                shape_string(&header.shape)
            ),
        ));
    }
    // fortran_order is irrelevant for 1-D data: both orders are the same bytes.
    check_len(path, file_len, &header)?;
    let n = usize::try_from(header.shape[0]).map_err(|_| {
        unsupported(
            path,
            "a label count that fits in memory",
            shape_string(&header.shape),
        )
    })?;
    let size = match dtype {
        IntDtype::I(s) | IntDtype::U(s) => s,
    };
    let mut labels = Vec::with_capacity(n);
    let mut raw = vec![0u8; (1 << 16) * size];
    let mut done = 0usize;
    while done < n {
        let take = (n - done).min(1 << 16);
        let chunk = &mut raw[..take * size];
        reader.read_exact(chunk).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                format_err(path, format!("{} bytes of labels", n * size), "end of file")
            } else {
                io_err(path, e)
            }
        })?;
        for (i, s) in chunk.chunks_exact(size).enumerate() {
            let mut buf = [0u8; 8];
            buf[..size].copy_from_slice(s);
            let value: i128 = match dtype {
                IntDtype::U(_) => u64::from_le_bytes(buf) as i128,
                IntDtype::I(_) => {
                    // Sign-extend from `size` bytes.
                    let shift = 64 - 8 * size as u32;
                    ((i64::from_le_bytes(buf) << shift) >> shift) as i128
                }
            };
            if value < 0 || value > u32::MAX as i128 {
                return Err(NpyError::LabelRange {
                    path: path.to_path_buf(),
                    index: (done + i) as u64,
                    max: u32::MAX as u64,
                    found: value,
                });
            }
            labels.push(value as u32);
        }
        done += take;
    }
    Ok(labels)
}

/// Writes a `.npy` file (version 1.0) from raw little-endian data. Used by
/// tests and benchmarks to produce inputs without numpy; `descr` must match
/// the bytes.
pub fn write_npy(
    path: impl AsRef<Path>,
    descr: &str,
    shape: &[u64],
    data: &[u8],
) -> std::io::Result<()> {
    use std::io::Write;
    let shape_text = shape_string(shape);
    let mut dict =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // numpy pads the header with spaces so data starts on a 64-byte boundary
    // and ends it with a newline.
    let unpadded = MAGIC.len() + 2 + 2 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    dict.push_str(&" ".repeat(pad));
    dict.push('\n');
    let mut file = std::io::BufWriter::new(File::create(path)?);
    file.write_all(MAGIC)?;
    file.write_all(&[1, 0])?;
    let len = u16::try_from(dict.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "header too long"))?;
    file.write_all(&len.to_le_bytes())?;
    file.write_all(dict.as_bytes())?;
    file.write_all(data)?;
    file.flush()
}

/// Writes a C-order float64 matrix as `<f8`.
pub fn write_f64_matrix(path: impl AsRef<Path>, x: &Array2<f64>) -> std::io::Result<()> {
    let mut data = Vec::with_capacity(x.len() * 8);
    for v in x.iter() {
        data.extend_from_slice(&v.to_le_bytes());
    }
    write_npy(path, "<f8", &[x.nrows() as u64, x.ncols() as u64], &data)
}

/// Writes labels as `<i8`.
pub fn write_labels_i64(path: impl AsRef<Path>, labels: &[i64]) -> std::io::Result<()> {
    let mut data = Vec::with_capacity(labels.len() * 8);
    for v in labels {
        data.extend_from_slice(&v.to_le_bytes());
    }
    write_npy(path, "<i8", &[labels.len() as u64], &data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a `.npy` byte stream with an arbitrary header text and version,
    /// so malformed headers can be produced on purpose.
    fn raw_npy(version: (u8, u8), header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[version.0, version.1]);
        if version.0 == 1 {
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn write_tmp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn f64_bytes(values: &[f64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn err_text(e: NpyError) -> String {
        e.to_string()
    }

    #[test]
    fn reads_all_three_versions() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f64> = (0..6).map(|i| i as f64 * 0.5 - 1.0).collect();
        for version in [(1, 0), (2, 0), (3, 0)] {
            let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }          \n";
            let path = write_tmp(
                &dir,
                &format!("v{}.npy", version.0),
                &raw_npy(version, header, &f64_bytes(&values)),
            );
            let mut r = FeatureReader::open(&path).unwrap();
            assert_eq!((r.rows(), r.cols(), r.dtype()), (2, 3, FloatDtype::F64));
            let x = r.read_rows(10).unwrap().unwrap();
            assert_eq!(x.as_slice().unwrap(), &values[..]);
            assert!(r.read_rows(10).unwrap().is_none());
        }
    }

    #[test]
    fn header_dict_key_order_and_quotes_do_not_matter() {
        let dir = tempfile::tempdir().unwrap();
        let header = "{\"shape\": (1, 2), \"fortran_order\": False, \"descr\": \"<f4\"}\n";
        let path = write_tmp(
            &dir,
            "a.npy",
            &raw_npy((1, 0), header, &f32_bytes(&[1.5, -2.0])),
        );
        let x = FeatureReader::open(&path)
            .unwrap()
            .read_rows(1)
            .unwrap()
            .unwrap();
        assert_eq!(x.as_slice().unwrap(), &[1.5, -2.0]);
    }

    #[test]
    fn streams_in_blocks_with_remainder_and_rewinds() {
        let dir = tempfile::tempdir().unwrap();
        let x = Array2::from_shape_fn((7, 3), |(i, j)| (i * 10 + j) as f64);
        let path = dir.path().join("x.npy");
        write_f64_matrix(&path, &x).unwrap();
        let mut r = FeatureReader::open(&path).unwrap();
        let mut seen = Vec::new();
        while let Some(block) = r.read_rows(3).unwrap() {
            seen.push(block.nrows());
            assert_eq!(block.ncols(), 3);
        }
        assert_eq!(seen, vec![3, 3, 1]);
        r.rewind().unwrap();
        let all = r.read_rows(100).unwrap().unwrap();
        assert_eq!(all, x);
    }

    #[test]
    fn float32_is_widened_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let vals = [0.1f32, f32::MAX, -f32::MIN_POSITIVE, 3.0];
        let path = dir.path().join("x.npy");
        write_npy(&path, "<f4", &[2, 2], &f32_bytes(&vals)).unwrap();
        let x = FeatureReader::open(&path)
            .unwrap()
            .read_rows(2)
            .unwrap()
            .unwrap();
        let want: Vec<f64> = vals.iter().map(|&v| v as f64).collect();
        assert_eq!(x.as_slice().unwrap(), &want[..]);
    }

    #[test]
    fn rejects_bad_magic() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_tmp(&dir, "bad.npy", b"PK\x03\x04 this is a zip file");
        let msg = err_text(FeatureReader::open(&path).unwrap_err());
        assert!(msg.contains("bad.npy"), "{msg}");
        assert!(msg.contains("magic string"), "{msg}");
        assert!(msg.contains("PK"), "{msg}");
    }

    #[test]
    fn rejects_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_tmp(&dir, "short.npy", b"\x93NUM");
        let msg = err_text(FeatureReader::open(&path).unwrap_err());
        assert!(
            msg.contains("short.npy") && msg.contains("end of file"),
            "{msg}"
        );
        let path = write_tmp(&dir, "short2.npy", &raw_npy((1, 0), "{'descr'", b"")[..14]);
        let msg = err_text(FeatureReader::open(&path).unwrap_err());
        assert!(
            msg.contains("header dictionary") && msg.contains("end of file"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_unknown_version() {
        let dir = tempfile::tempdir().unwrap();
        let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (0, 3), }\n";
        for (v, shown) in [
            ((4, 0), "version 4.0"),
            ((1, 1), "version 1.1"),
            ((0, 0), "version 0.0"),
        ] {
            let path = write_tmp(&dir, "v.npy", &raw_npy(v, header, b""));
            let msg = err_text(FeatureReader::open(&path).unwrap_err());
            assert!(
                msg.contains("format version 1.0, 2.0 or 3.0") && msg.contains(shown),
                "{msg}"
            );
        }
    }

    #[test]
    fn rejects_malformed_header_dicts() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("'just a string'", "instead of a dict"),
            (
                "{'descr': '<f8', 'fortran_order': False}",
                "the key 'shape'",
            ),
            (
                "{'descr': '<f8', 'shape': (1, 1)}",
                "the key 'fortran_order'",
            ),
            (
                "{'fortran_order': False, 'shape': (1, 1)}",
                "the key 'descr'",
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1), 'extra': 1}",
                "key \"extra\"",
            ),
            (
                "{'descr': '<f8', 'fortran_order': 0, 'shape': (1, 1)}",
                "True or False",
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (1, -1)}",
                "non-negative integers",
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': [1, 1]}",
                "a tuple for 'shape'",
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1)",
                "end of header",
            ),
            (
                "{'descr': '<f8' 'fortran_order': False, 'shape': (1, 1)}",
                "inside the dict",
            ),
            (
                "{'descr': '<f8', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
                "duplicate key",
            ),
            (
                "{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (1,)}",
                "simple dtype string",
            ),
            (
                "{'descr': '<f8', 'fortran_order': Maybe, 'shape': (1,)}",
                "unknown name",
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1)} junk",
                "unexpected",
            ),
        ];
        for (header, needle) in cases {
            let path = write_tmp(&dir, "h.npy", &raw_npy((1, 0), header, &[0u8; 8]));
            let msg = err_text(FeatureReader::open(&path).unwrap_err());
            assert!(msg.contains("h.npy"), "{msg}");
            assert!(msg.contains(needle), "header {header:?}: {msg}");
        }
    }

    #[test]
    fn rejects_deeply_nested_header_without_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let header = format!("{}{}", "(".repeat(10_000), ")".repeat(10_000));
        let path = write_tmp(&dir, "deep.npy", &raw_npy((2, 0), &header, b""));
        let msg = err_text(FeatureReader::open(&path).unwrap_err());
        assert!(msg.contains("nesting deeper"), "{msg}");
    }

    #[test]
    fn feature_dtype_rank_and_order_errors_name_expected_and_found() {
        let dir = tempfile::tempdir().unwrap();
        // (descr, file name, shape, data bytes, message must contain)
        type Case<'a> = (&'a str, &'a str, &'a [u64], usize, &'a [&'a str]);
        let cases: [Case; 6] = [
            (
                "<i4",
                "i4.npy",
                &[2, 2],
                16,
                &["'<f4' (float32) or '<f8' (float64)", "dtype '<i4'"],
            ),
            (">f8", "be.npy", &[2, 2], 32, &["'<f4'", "dtype '>f8'"]),
            ("<f2", "half.npy", &[2, 2], 8, &["'<f4'", "dtype '<f2'"]),
            (
                "<f8",
                "rank1.npy",
                &[4],
                32,
                &["2-D feature array", "1-D array of shape (4,)"],
            ),
            (
                "<f8",
                "rank3.npy",
                &[1, 2, 2],
                32,
                &["2-D", "3-D array of shape (1, 2, 2)"],
            ),
            ("<f4", "ok.npy", &[2, 2], 16, &[]),
        ];
        for (descr, name, shape, bytes, needles) in cases {
            let path = dir.path().join(name);
            write_npy(&path, descr, shape, &vec![0u8; bytes]).unwrap();
            let result = FeatureReader::open(&path);
            if needles.is_empty() {
                assert!(result.is_ok());
                continue;
            }
            let msg = err_text(result.unwrap_err());
            assert!(msg.contains(name), "{msg}");
            for needle in needles {
                assert!(msg.contains(needle), "{name}: {msg}");
            }
        }
        let header = "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 2), }\n";
        let path = write_tmp(&dir, "fort.npy", &raw_npy((1, 0), header, &[0u8; 32]));
        let msg = err_text(FeatureReader::open(&path).unwrap_err());
        assert!(
            msg.contains("fort.npy") && msg.contains("C (row-major) order"),
            "{msg}"
        );
        assert!(msg.contains("fortran_order True"), "{msg}");
    }

    #[test]
    fn data_length_must_match_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trunc.npy");
        write_npy(&path, "<f4", &[3, 2], &[0u8; 20]).unwrap();
        let msg = err_text(FeatureReader::open(&path).unwrap_err());
        assert!(msg.contains("trunc.npy"), "{msg}");
        assert!(
            msg.contains("expected 24 bytes") && msg.contains("found 20"),
            "{msg}"
        );
        assert!(msg.contains("(3, 2)"), "{msg}");
        let path = dir.path().join("long.npy");
        write_npy(&path, "<f4", &[3, 2], &[0u8; 25]).unwrap();
        let msg = err_text(FeatureReader::open(&path).unwrap_err());
        assert!(
            msg.contains("expected 24 bytes") && msg.contains("found 25"),
            "{msg}"
        );
        let path = dir.path().join("labels.npy");
        write_npy(&path, "<i8", &[3], &[0u8; 16]).unwrap();
        let msg = err_text(read_labels(&path).unwrap_err());
        assert!(
            msg.contains("labels.npy") && msg.contains("expected 24 bytes"),
            "{msg}"
        );
    }

    #[test]
    fn shape_overflow_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let header =
            "{'descr': '<f8', 'fortran_order': False, 'shape': (18446744073709551615, 4), }\n";
        let path = write_tmp(&dir, "huge.npy", &raw_npy((1, 0), header, b""));
        let msg = err_text(FeatureReader::open(&path).unwrap_err());
        assert!(msg.contains("fits in 64 bits"), "{msg}");
    }

    #[test]
    fn labels_of_every_integer_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let want = [0u32, 1, 2, 127, 5];
        for (descr, size) in [
            ("|i1", 1),
            ("<i1", 1),
            ("<i2", 2),
            ("<i4", 4),
            ("<i8", 8),
            ("|u1", 1),
            ("<u2", 2),
            ("<u4", 4),
            ("<u8", 8),
        ] {
            let mut data = Vec::new();
            for &v in &want {
                data.extend_from_slice(&(v as u64).to_le_bytes()[..size]);
            }
            let path = dir.path().join("y.npy");
            write_npy(&path, descr, &[want.len() as u64], &data).unwrap();
            assert_eq!(read_labels(&path).unwrap(), want, "{descr}");
        }
    }

    #[test]
    fn negative_and_oversized_labels_name_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("neg.npy");
        write_npy(&path, "|i1", &[3], &[0, 1, 0xFE]).unwrap();
        let msg = err_text(read_labels(&path).unwrap_err());
        assert!(msg.contains("neg.npy") && msg.contains("index 2"), "{msg}");
        assert!(
            msg.contains("found -2") && msg.contains("[0, 4294967295]"),
            "{msg}"
        );
        let path = dir.path().join("neg8.npy");
        write_labels_i64(&path, &[3, i64::MIN]).unwrap();
        let msg = err_text(read_labels(&path).unwrap_err());
        assert!(
            msg.contains("index 1") && msg.contains(&i64::MIN.to_string()),
            "{msg}"
        );
        let path = dir.path().join("big.npy");
        write_npy(&path, "<u8", &[1], &(1u64 << 40).to_le_bytes()).unwrap();
        let msg = err_text(read_labels(&path).unwrap_err());
        assert!(
            msg.contains("index 0") && msg.contains(&(1u64 << 40).to_string()),
            "{msg}"
        );
    }

    #[test]
    fn label_dtype_and_rank_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u64], usize, &str); 5] = [
            ("<f8", &[2], 16, "dtype '<f8'"),
            (">i4", &[2], 8, "dtype '>i4'"),
            ("|b1", &[2], 2, "dtype '|b1'"),
            ("<i8", &[2, 1], 16, "2-D array of shape (2, 1)"),
            ("<i8", &[], 8, "0-D array of shape ()"),
        ];
        for (descr, shape, bytes, needle) in cases {
            let path = dir.path().join("lab.npy");
            write_npy(&path, descr, shape, &vec![0u8; bytes]).unwrap();
            let msg = err_text(read_labels(&path).unwrap_err());
            assert!(
                msg.contains("lab.npy") && msg.contains(needle),
                "{descr}: {msg}"
            );
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let msg = err_text(read_labels("/nonexistent/dir/y.npy").unwrap_err());
        assert!(
            msg.contains("/nonexistent/dir/y.npy") && msg.contains("cannot read"),
            "{msg}"
        );
    }
}
