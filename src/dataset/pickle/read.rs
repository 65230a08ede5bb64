//! The pickle reader: a small, strict pickle VM that reads what numpy writes for a CIFAR
//! batch dict (protocols 0–5), every error naming the file and byte offset.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use crate::dataset::{Images, CLASSES, IMAGE_BYTES};
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------
// Pickle reader: a small VM with a value stack, a mark stack and a memo.
//
// Containers live in an arena (`Vm::nodes`) and values refer to them by index, so shared and
// even cyclic references (via the memo) are harmless and nothing is dropped recursively.
// Strings and bytes are borrowed from the input; only text that needs decoding is owned.

/// A value on the stack or in the memo.
#[derive(Clone, Copy, Debug)]
pub(in crate::dataset) enum Value<'a> {
    None,
    Bool(bool),
    Int(i64),
    /// An int that does not fit in 64 bits (never valid where this reader needs an int).
    BigInt,
    Float(f64),
    /// A Python-2 `str` or Python-3 `bytes`, borrowed from the input.
    Bytes(&'a [u8]),
    /// A unicode string, borrowed from the input.
    Text(&'a str),
    /// Anything else: an index into the arena.
    Node(usize),
}

/// An arena object.
#[derive(Debug)]
enum Node<'a> {
    Tuple(Vec<Value<'a>>),
    List(Vec<Value<'a>>),
    Dict(Vec<(Value<'a>, Value<'a>)>),
    Set(Vec<Value<'a>>),
    Bytes(Vec<u8>),
    Text(String),
    Global(Global),
    Dtype(Dtype),
    Array(Array<'a>),
}

impl Node<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Node::Tuple(_) => "tuple",
            Node::List(_) => "list",
            Node::Dict(_) => "dict",
            Node::Set(_) => "set",
            Node::Bytes(_) => "bytes",
            Node::Text(_) => "str",
            Node::Global(_) => "global",
            Node::Dtype(_) => "numpy dtype",
            Node::Array(_) => "numpy array",
        }
    }
}

/// The globals this reader knows how to call.
#[derive(Clone, Debug)]
enum Global {
    /// `numpy.core.multiarray._reconstruct` (or `numpy._core…`).
    Reconstruct,
    /// `numpy.core.numeric._frombuffer` (protocol 5 numpy pickles).
    FromBuffer,
    /// `numpy.ndarray`.
    NdArray,
    /// `numpy.dtype`.
    Dtype,
    /// `_codecs.encode`.
    CodecsEncode,
    /// `__builtin__.bytes` / `builtins.bytes` / `bytearray`.
    Bytes,
    /// Anything else, by its dotted name (an error if called).
    Other(String),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Global {
        let numpy = module == "numpy" || module.starts_with("numpy.");
        match (module, name) {
            (_, "_reconstruct") if numpy => Global::Reconstruct,
            (_, "_frombuffer") if numpy => Global::FromBuffer,
            (_, "ndarray") if numpy => Global::NdArray,
            (_, "dtype") if numpy => Global::Dtype,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("__builtin__" | "builtins", "bytes" | "bytearray") => Global::Bytes,
            _ => Global::Other(format!("{module}.{name}")),
        }
    }
}

/// A numpy dtype: the type string given to `numpy.dtype` and the byte order from its state.
#[derive(Clone, Debug)]
struct Dtype {
    name: String,
    order: u8,
}

impl Dtype {
    /// Kind letter and item size of a plain numeric dtype (`'u1'` → `(b'u', 1)`).
    fn simple(&self) -> Option<(u8, usize)> {
        let name = self.name.trim_start_matches(['<', '>', '|', '=']);
        let named = match name {
            "uint8" | "B" => Some((b'u', 1)),
            "int8" | "b" => Some((b'i', 1)),
            "uint16" => Some((b'u', 2)),
            "int16" => Some((b'i', 2)),
            "uint32" => Some((b'u', 4)),
            "int32" => Some((b'i', 4)),
            "uint64" => Some((b'u', 8)),
            "int64" => Some((b'i', 8)),
            _ => None,
        };
        if named.is_some() {
            return named;
        }
        let (&kind, size) = name.as_bytes().split_first()?;
        if !b"biufc".contains(&kind) {
            return None;
        }
        let size = std::str::from_utf8(size).ok()?.parse::<usize>().ok()?;
        Some((kind, size))
    }

    fn big_endian(&self) -> bool {
        self.order == b'>' || self.name.starts_with('>')
    }

    fn is_uint8(&self) -> bool {
        self.simple() == Some((b'u', 1))
    }
}

/// A numpy array: empty after `_reconstruct`, filled by BUILD.
#[derive(Debug)]
enum Array<'a> {
    Empty,
    Filled(NdArray<'a>),
}

/// A filled numpy array. Its byte length matches its shape and item size.
#[derive(Clone, Debug)]
struct NdArray<'a> {
    dims: Vec<i64>,
    dtype: Dtype,
    fortran: bool,
    /// The raw bytes: `Value::Bytes` or a `Node::Bytes`.
    data: Value<'a>,
}

/// The pickle opcodes' names, for messages.
fn op_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

/// The pickle machine.
pub(in crate::dataset) struct Vm<'a> {
    input: &'a [u8],
    path: &'a Path,
    /// Next byte to read.
    pos: usize,
    /// Offset of the opcode being executed (for errors).
    op_at: usize,
    op: u8,
    stack: Vec<Value<'a>>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, Value<'a>>,
    nodes: Vec<Node<'a>>,
    /// Offset of the opcode that created each node.
    node_at: Vec<usize>,
}

impl<'a> Vm<'a> {
    pub(in crate::dataset) fn new(input: &'a [u8], path: &'a Path) -> Self {
        Vm {
            input,
            path,
            pos: 0,
            op_at: 0,
            op: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            nodes: Vec::new(),
            node_at: Vec::new(),
        }
    }

    fn err_at(&self, at: usize, reason: impl Into<String>) -> Error {
        Error::format(self.path, at as u64, reason)
    }

    /// An error at the current opcode, prefixed with its name.
    fn err(&self, reason: impl fmt::Display) -> Error {
        let name = op_name(self.op).unwrap_or("?");
        self.err_at(self.op_at, format!("pickle {name}: {reason}"))
    }

    fn new_node(&mut self, node: Node<'a>) -> Value<'a> {
        self.nodes.push(node);
        self.node_at.push(self.op_at);
        Value::Node(self.nodes.len() - 1)
    }

    // --- reading the input ---

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let input = self.input;
        let end = self.pos.checked_add(n).filter(|&e| e <= input.len());
        match end.and_then(|e| input.get(self.pos..e)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated: needs {n} bytes of argument, the file has {} left",
                input.len().saturating_sub(self.pos)
            ))),
        }
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn read_u8(&mut self) -> Result<u8> {
        Ok(self.take_array::<1>()?[0])
    }

    fn read_u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take_array()?))
    }

    fn read_u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take_array()?))
    }

    fn read_i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.take_array()?))
    }

    fn read_u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take_array()?))
    }

    /// A length from a u64, as usize.
    fn len64(&mut self) -> Result<usize> {
        let n = self.read_u64()?;
        usize::try_from(n).map_err(|_| self.err(format!("length {n} too large")))
    }

    /// A length from a signed 4-byte int (Python 2 BINSTRING, LONG4).
    fn len_i32(&mut self) -> Result<usize> {
        let n = self.read_i32()?;
        usize::try_from(n).map_err(|_| self.err(format!("negative length {n}")))
    }

    /// A newline-terminated line, without the newline.
    fn line(&mut self) -> Result<&'a [u8]> {
        let input = self.input;
        let rest = input.get(self.pos..).unwrap_or(&[]);
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                let line = rest.get(..n).unwrap_or(&[]);
                self.pos += n + 1;
                Ok(line)
            }
            None => Err(self.err("truncated: argument line has no newline")),
        }
    }

    fn line_str(&mut self) -> Result<&'a str> {
        let line = self.line()?;
        std::str::from_utf8(line).map_err(|_| self.err("argument line is not UTF-8"))
    }

    fn text(&self, bytes: &'a [u8]) -> Result<&'a str> {
        std::str::from_utf8(bytes).map_err(|e| self.err(format!("string is not valid UTF-8: {e}")))
    }

    // --- the stacks ---

    /// Height of the stack at the innermost MARK (values below it are out of reach).
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: Value<'a>) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value<'a>> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<Value<'a>> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err("stack underflow"))
    }

    /// Pop everything above the innermost MARK, and the MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value<'a>>> {
        let Some(m) = self.marks.pop() else {
            return Err(self.err("no MARK on the stack"));
        };
        if m > self.stack.len() {
            return Err(self.err("MARK above the stack top"));
        }
        Ok(self.stack.split_off(m))
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Value<'a>>> {
        if self.stack.len() < self.floor() + n {
            return Err(self.err("stack underflow"));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let v = self.top()?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        match self.memo.get(&key) {
            Some(&v) => {
                self.push(v);
                Ok(())
            }
            None => Err(self.err(format!("memo key {key} was never stored"))),
        }
    }

    // --- looking at values ---

    fn node(&self, v: Value<'a>) -> Option<&Node<'a>> {
        match v {
            Value::Node(i) => self.nodes.get(i),
            _ => None,
        }
    }

    fn describe(&self, v: Value<'a>) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::BigInt => "a big int".into(),
            Value::Float(f) => format!("float {f}"),
            Value::Bytes(b) => format!("bytes of length {}", b.len()),
            Value::Text(t) => format!("str of length {}", t.len()),
            Value::Node(_) => match self.node(v) {
                Some(Node::Global(Global::Other(name))) => format!("global {name}"),
                Some(n) => n.kind().into(),
                None => "?".into(),
            },
        }
    }

    /// The bytes of a str/bytes value, for keys and names.
    fn bytes_of(&self, v: Value<'a>) -> Option<&[u8]> {
        match v {
            Value::Bytes(b) => Some(b),
            Value::Text(t) => Some(t.as_bytes()),
            _ => match self.node(v) {
                Some(Node::Bytes(b)) => Some(b),
                Some(Node::Text(t)) => Some(t.as_bytes()),
                _ => None,
            },
        }
    }

    fn name_of(&self, v: Value<'a>, what: &str) -> Result<String> {
        self.bytes_of(v)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| self.err(format!("{what} is {}, not a string", self.describe(v))))
    }

    /// The text of a unicode value (only `str`, not bytes).
    fn text_of(&self, v: Value<'a>) -> Option<&str> {
        match v {
            Value::Text(t) => Some(t),
            _ => match self.node(v) {
                Some(Node::Text(t)) => Some(t),
                _ => None,
            },
        }
    }

    /// The items of a small tuple (argument lists, states, shapes). Longer tuples are an
    /// error, so that a hostile pickle cannot make every REDUCE copy a huge tuple.
    fn tuple_items(&self, v: Value<'a>, what: &str) -> Result<Vec<Value<'a>>> {
        const MAX_ITEMS: usize = 32;
        match self.node(v) {
            Some(Node::Tuple(items)) if items.len() <= MAX_ITEMS => Ok(items.clone()),
            Some(Node::Tuple(items)) => Err(self.err(format!(
                "{what} is a tuple of {} items, expected at most {MAX_ITEMS}",
                items.len()
            ))),
            _ => Err(self.err(format!("{what} is {}, not a tuple", self.describe(v)))),
        }
    }

    fn int_of(&self, v: Value<'a>, what: &str) -> Result<i64> {
        match v {
            Value::Int(i) => Ok(i),
            Value::Bool(b) => Ok(i64::from(b)),
            _ => Err(self.err(format!("{what} is {}, not an int", self.describe(v)))),
        }
    }

    // --- the machine ---

    pub(in crate::dataset) fn run(&mut self) -> Result<Value<'a>> {
        loop {
            self.op_at = self.pos;
            let Some(&op) = self.input.get(self.pos) else {
                return Err(self.err_at(
                    self.pos,
                    "pickle truncated: the file ends before the STOP opcode",
                ));
            };
            self.op = op;
            self.pos += 1;
            if op == b'.' {
                return self.pop();
            }
            self.step(op)?;
        }
    }

    fn step(&mut self, op: u8) -> Result<()> {
        match op {
            0x80 => {
                let proto = self.read_u8()?;
                if proto > 5 {
                    return Err(self.err(format!("unsupported protocol {proto}")));
                }
            }
            0x95 => {
                // FRAME: only a length prefix; the framed opcodes follow inline.
                self.read_u64()?;
            }
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                if self.stack.len() > self.floor() {
                    self.stack.pop();
                } else {
                    self.pop_mark()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?;
                self.push(v);
            }
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'I' => {
                let line = self.line_str()?;
                let v = match line {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => self.parse_int(line)?,
                };
                self.push(v);
            }
            b'L' => {
                let line = self.line_str()?;
                let v = self.parse_int(line.strip_suffix('L').unwrap_or(line))?;
                self.push(v);
            }
            b'J' => {
                let i = self.read_i32()?;
                self.push(Value::Int(i64::from(i)));
            }
            b'K' => {
                let i = self.read_u8()?;
                self.push(Value::Int(i64::from(i)));
            }
            b'M' => {
                let i = self.read_u16()?;
                self.push(Value::Int(i64::from(i)));
            }
            0x8a => {
                let n = usize::from(self.read_u8()?);
                let bytes = self.take(n)?;
                self.push(decode_long(bytes));
            }
            0x8b => {
                let n = self.len_i32()?;
                let bytes = self.take(n)?;
                self.push(decode_long(bytes));
            }
            b'F' => {
                let line = self.line_str()?;
                let f = line
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| self.err(format!("bad float {line:?}")))?;
                self.push(Value::Float(f));
            }
            b'G' => {
                let f = f64::from_be_bytes(self.take_array()?);
                self.push(Value::Float(f));
            }
            b'S' => {
                let line = self.line()?;
                let bytes = unquote_string(line).map_err(|e| self.err(e))?;
                let v = self.new_node(Node::Bytes(bytes));
                self.push(v);
            }
            b'T' => {
                let n = self.len_i32()?;
                let b = self.take(n)?;
                self.push(Value::Bytes(b));
            }
            b'U' | b'C' => {
                let n = usize::from(self.read_u8()?);
                let b = self.take(n)?;
                self.push(Value::Bytes(b));
            }
            b'B' => {
                let n = self.read_u32()? as usize;
                let b = self.take(n)?;
                self.push(Value::Bytes(b));
            }
            0x8e | 0x96 => {
                let n = self.len64()?;
                let b = self.take(n)?;
                self.push(Value::Bytes(b));
            }
            b'V' => {
                let line = self.line()?;
                let text = raw_unicode_escape(line).map_err(|e| self.err(e))?;
                let v = self.new_node(Node::Text(text));
                self.push(v);
            }
            b'X' => {
                let n = self.read_u32()? as usize;
                let b = self.take(n)?;
                let t = self.text(b)?;
                self.push(Value::Text(t));
            }
            0x8c => {
                let n = usize::from(self.read_u8()?);
                let b = self.take(n)?;
                let t = self.text(b)?;
                self.push(Value::Text(t));
            }
            0x8d => {
                let n = self.len64()?;
                let b = self.take(n)?;
                let t = self.text(b)?;
                self.push(Value::Text(t));
            }
            b'}' => {
                let v = self.new_node(Node::Dict(Vec::new()));
                self.push(v);
            }
            b']' => {
                let v = self.new_node(Node::List(Vec::new()));
                self.push(v);
            }
            b')' => {
                let v = self.new_node(Node::Tuple(Vec::new()));
                self.push(v);
            }
            0x8f => {
                let v = self.new_node(Node::Set(Vec::new()));
                self.push(v);
            }
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = self.pairs(items)?;
                let v = self.new_node(Node::Dict(pairs));
                self.push(v);
            }
            b'l' => {
                let items = self.pop_mark()?;
                let v = self.new_node(Node::List(items));
                self.push(v);
            }
            b't' => {
                let items = self.pop_mark()?;
                let v = self.new_node(Node::Tuple(items));
                self.push(v);
            }
            0x91 => {
                let items = self.pop_mark()?;
                let v = self.new_node(Node::Set(items));
                self.push(v);
            }
            0x85..=0x87 => {
                let items = self.pop_n(usize::from(op - 0x84))?;
                let v = self.new_node(Node::Tuple(items));
                self.push(v);
            }
            b'a' => {
                let v = self.pop()?;
                self.extend_top(vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.extend_top(items)?;
            }
            b's' => {
                let items = self.pop_n(2)?;
                self.set_items_top(items)?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items_top(items)?;
            }
            b'p' => {
                let key = self.line_int_arg()?;
                self.memo_put(key)?;
            }
            b'q' => {
                let key = self.read_u8()?;
                self.memo_put(u64::from(key))?;
            }
            b'r' => {
                let key = self.read_u32()?;
                self.memo_put(u64::from(key))?;
            }
            0x94 => {
                let key = self.memo.len() as u64;
                self.memo_put(key)?;
            }
            b'g' => {
                let key = self.line_int_arg()?;
                self.memo_get(key)?;
            }
            b'h' => {
                let key = self.read_u8()?;
                self.memo_get(u64::from(key))?;
            }
            b'j' => {
                let key = self.read_u32()?;
                self.memo_get(u64::from(key))?;
            }
            b'c' => {
                let module = self.line_str()?;
                let name = self.line_str()?;
                let v = self.new_node(Node::Global(Global::resolve(module, name)));
                self.push(v);
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let name = self.name_of(name, "global name")?;
                let module = self.name_of(module, "global module")?;
                let v = self.new_node(Node::Global(Global::resolve(&module, &name)));
                self.push(v);
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = self.reduce(func, args)?;
                self.push(v);
            }
            b'b' => {
                let state = self.pop()?;
                let obj = self.top()?;
                self.build(obj, state)?;
            }
            _ => {
                return Err(match op_name(op) {
                    Some(name) => self.err_at(
                        self.op_at,
                        format!("unsupported pickle opcode {name} (0x{op:02x})"),
                    ),
                    None => self.err_at(
                        self.op_at,
                        format!(
                            "unknown pickle opcode 0x{op:02x} ({:?}): not a pickle, or corrupt",
                            char::from(op)
                        ),
                    ),
                });
            }
        }
        Ok(())
    }

    fn parse_int(&self, text: &str) -> Result<Value<'a>> {
        let t = text.trim();
        if let Ok(i) = t.parse::<i64>() {
            return Ok(Value::Int(i));
        }
        let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Value::BigInt)
        } else {
            Err(self.err(format!("bad int {text:?}")))
        }
    }

    fn line_int_arg(&mut self) -> Result<u64> {
        let line = self.line_str()?;
        line.trim()
            .parse::<u64>()
            .map_err(|_| self.err(format!("bad memo key {line:?}")))
    }

    fn pairs(&self, items: Vec<Value<'a>>) -> Result<Vec<(Value<'a>, Value<'a>)>> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err(format!("odd number of items ({}) for a dict", items.len())));
        }
        let mut it = items.into_iter();
        let mut pairs = Vec::with_capacity(it.len() / 2);
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        Ok(pairs)
    }

    fn extend_top(&mut self, items: Vec<Value<'a>>) -> Result<()> {
        let target = self.top()?;
        if let Value::Node(i) = target {
            if let Some(Node::List(list) | Node::Set(list)) = self.nodes.get_mut(i) {
                list.extend(items);
                return Ok(());
            }
        }
        Err(self.err(format!("cannot append to {}", self.describe(target))))
    }

    fn set_items_top(&mut self, items: Vec<Value<'a>>) -> Result<()> {
        let pairs = self.pairs(items)?;
        let target = self.top()?;
        if let Value::Node(i) = target {
            if let Some(Node::Dict(dict)) = self.nodes.get_mut(i) {
                dict.extend(pairs);
                return Ok(());
            }
        }
        Err(self.err(format!("cannot set items of {}", self.describe(target))))
    }

    fn reduce(&mut self, func: Value<'a>, args: Value<'a>) -> Result<Value<'a>> {
        let global = match self.node(func) {
            Some(Node::Global(g)) => g.clone(),
            _ => {
                return Err(self.err(format!(
                    "cannot call {}: only numpy globals are supported",
                    self.describe(func)
                )))
            }
        };
        let args = self.tuple_items(args, "argument list")?;
        match global {
            Global::Reconstruct => match args.as_slice() {
                [_class, _shape, _typecode] => Ok(self.new_node(Node::Array(Array::Empty))),
                _ => Err(self.err(format!(
                    "numpy _reconstruct takes 3 arguments, got {}",
                    args.len()
                ))),
            },
            Global::Dtype => match args.as_slice() {
                [name, ..] if args.len() <= 3 => {
                    let name = self.name_of(*name, "dtype")?;
                    Ok(self.new_node(Node::Dtype(Dtype { name, order: b'=' })))
                }
                _ => Err(self.err(format!(
                    "numpy dtype takes 1 to 3 arguments, got {}",
                    args.len()
                ))),
            },
            Global::CodecsEncode => {
                let (text, encoding) = match args.as_slice() {
                    [t] => (*t, "utf-8".to_string()),
                    [t, e] => (*t, self.name_of(*e, "encoding")?),
                    _ => {
                        return Err(self.err(format!(
                            "_codecs.encode takes 1 or 2 arguments, got {}",
                            args.len()
                        )))
                    }
                };
                let Some(text) = self.text_of(text) else {
                    return Err(self.err(format!(
                        "_codecs.encode of {}, not a str",
                        self.describe(text)
                    )));
                };
                let bytes = encode_text(text, &encoding).map_err(|e| self.err(e))?;
                Ok(self.new_node(Node::Bytes(bytes)))
            }
            Global::Bytes => match args.as_slice() {
                [] => Ok(self.new_node(Node::Bytes(Vec::new()))),
                [b] if self.bytes_of(*b).is_some() && self.text_of(*b).is_none() => Ok(*b),
                _ => Err(self.err("unsupported arguments to bytes()")),
            },
            Global::FromBuffer => match args.as_slice() {
                [buf, dtype, shape, order] => {
                    let fortran = self.bytes_of(*order) == Some(b"F");
                    let array = self.make_array(*shape, *dtype, fortran, *buf)?;
                    Ok(self.new_node(Node::Array(Array::Filled(array))))
                }
                _ => Err(self.err(format!(
                    "numpy _frombuffer takes 4 arguments, got {}",
                    args.len()
                ))),
            },
            Global::NdArray => Err(self.err("calling numpy.ndarray directly is not supported")),
            Global::Other(name) => Err(self.err(format!(
                "cannot call {name}: this reader only builds numpy arrays"
            ))),
        }
    }

    fn build(&mut self, obj: Value<'a>, state: Value<'a>) -> Result<()> {
        match self.node(obj) {
            Some(Node::Array(Array::Empty)) => {
                let items = self.tuple_items(state, "array state")?;
                let (shape, dtype, fortran, data) = match items.as_slice() {
                    [version, shape, dtype, fortran, data] => {
                        let v = self.int_of(*version, "array state version")?;
                        if v != 1 {
                            return Err(self.err(format!("unsupported array state version {v}")));
                        }
                        (*shape, *dtype, *fortran, *data)
                    }
                    [shape, dtype, fortran, data] => (*shape, *dtype, *fortran, *data),
                    _ => {
                        return Err(self.err(format!(
                            "array state has {} items, expected 4 or 5",
                            items.len()
                        )))
                    }
                };
                let fortran = self.int_of(fortran, "array Fortran flag")? != 0;
                let array = self.make_array(shape, dtype, fortran, data)?;
                if let Value::Node(i) = obj {
                    if let Some(n) = self.nodes.get_mut(i) {
                        *n = Node::Array(Array::Filled(array));
                    }
                    if let Some(at) = self.node_at.get_mut(i) {
                        *at = self.op_at;
                    }
                }
                Ok(())
            }
            Some(Node::Array(Array::Filled(_))) => {
                Err(self.err("BUILD on an array that was already filled"))
            }
            Some(Node::Dtype(_)) => {
                // (version, byte order, subarray, names, fields, elsize, alignment, flags)
                let items = self.tuple_items(state, "dtype state")?;
                let order = match items.get(1) {
                    None => b'=',
                    Some(v) => match self.bytes_of(*v) {
                        Some([o @ (b'|' | b'<' | b'>' | b'=')]) => *o,
                        _ => {
                            return Err(self.err(format!(
                                "dtype byte order is {}, expected one of | < > =",
                                self.describe(*v)
                            )))
                        }
                    },
                };
                if let Value::Node(i) = obj {
                    if let Some(Node::Dtype(d)) = self.nodes.get_mut(i) {
                        d.order = order;
                    }
                }
                Ok(())
            }
            _ => Err(self.err(format!(
                "cannot BUILD {}: only numpy arrays and dtypes are supported",
                self.describe(obj)
            ))),
        }
    }

    /// Check an array description: a shape of non-negative ints, a dtype, and raw bytes of
    /// the matching length.
    fn make_array(
        &self,
        shape: Value<'a>,
        dtype: Value<'a>,
        fortran: bool,
        data: Value<'a>,
    ) -> Result<NdArray<'a>> {
        let Some(Node::Dtype(dtype)) = self.node(dtype) else {
            return Err(self.err(format!(
                "array dtype is {}, not a numpy dtype",
                self.describe(dtype)
            )));
        };
        let dims = self.tuple_items(shape, "array shape")?;
        let dims = dims
            .iter()
            .map(|d| match self.int_of(*d, "array dimension")? {
                n if n < 0 => Err(self.err(format!("negative array dimension {n}"))),
                n => Ok(n),
            })
            .collect::<Result<Vec<i64>>>()?;
        let Some(bytes) = self.bytes_of(data) else {
            return Err(self.err(format!(
                "array data is {}, expected raw bytes (object arrays are not supported)",
                self.describe(data)
            )));
        };
        if let Some((_, size)) = dtype.simple() {
            let need = dims
                .iter()
                .try_fold(size as u128, |acc, &d| acc.checked_mul(d as u128));
            if need != Some(bytes.len() as u128) {
                return Err(self.err(format!(
                    "array data is {} bytes, but shape {dims:?} of '{}' needs {}",
                    bytes.len(),
                    dtype.name,
                    need.map_or_else(|| "more".to_string(), |n| n.to_string())
                )));
            }
        }
        Ok(NdArray {
            dims,
            dtype: dtype.clone(),
            fortran,
            data,
        })
    }

    /// The labels: a list or tuple of ints, or a 1-D integer numpy array. Returns them with
    /// the offset of the opcode that made them.
    fn label_values(&self, labels: Value<'a>, stop_at: usize) -> Result<(Vec<i64>, usize)> {
        let Value::Node(i) = labels else {
            let what = self.describe(labels);
            return Err(self.err_at(stop_at, format!("'labels' is {what}, not a list")));
        };
        let at = self.node_at.get(i).copied().unwrap_or(stop_at);
        match self.nodes.get(i) {
            Some(Node::List(items) | Node::Tuple(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (k, v) in items.iter().enumerate() {
                    match v {
                        Value::Int(l) => out.push(*l),
                        _ => {
                            return Err(self.err_at(
                                at,
                                format!(
                                    "labels[{k}] is {}, not an int (list starts here)",
                                    self.describe(*v)
                                ),
                            ))
                        }
                    }
                }
                Ok((out, at))
            }
            Some(Node::Array(Array::Filled(a))) => {
                let (kind, size) = a.dtype.simple().unwrap_or((b'?', 0));
                let int = (kind == b'i' || kind == b'u') && matches!(size, 1 | 2 | 4 | 8);
                let bytes = self.bytes_of(a.data).unwrap_or(&[]);
                if !int || a.dims.len() != 1 {
                    return Err(self.err_at(
                        at,
                        format!(
                            "'labels' is a numpy array of '{}' with shape {:?}, expected 1-D ints",
                            a.dtype.name, a.dims
                        ),
                    ));
                }
                let big = a.dtype.big_endian();
                let out = bytes
                    .chunks_exact(size)
                    .map(|c| {
                        // Widen to 8 little-endian bytes, sign-extending signed kinds.
                        let mut le = [0u8; 8];
                        for (k, &b) in c.iter().enumerate() {
                            let k = if big { size - 1 - k } else { k };
                            if let Some(d) = le.get_mut(k) {
                                *d = b;
                            }
                        }
                        let top = le.get(size - 1).copied().unwrap_or(0);
                        if kind == b'i' && top & 0x80 != 0 {
                            for d in le.iter_mut().skip(size) {
                                *d = 0xff;
                            }
                        }
                        i64::from_le_bytes(le)
                    })
                    .collect();
                Ok((out, at))
            }
            _ => {
                let what = self.describe(labels);
                Err(self.err_at(at, format!("'labels' is {what}, not a list")))
            }
        }
    }

    /// Turn the unpickled dict into images.
    pub(in crate::dataset) fn finish(self, top: Value<'a>) -> Result<Images> {
        self.finish_with(top, b"labels", CLASSES)
    }

    /// The list of strings under `key` of the top dict (CIFAR-100's `meta`).
    pub(in crate::dataset) fn finish_names(
        self,
        top: Value<'a>,
        key: &[u8],
    ) -> Result<Vec<String>> {
        let stop_at = self.op_at;
        let k = String::from_utf8_lossy(key).into_owned();
        let Some(Node::Dict(pairs)) = self.node(top) else {
            let what = self.describe(top);
            return Err(self.err_at(stop_at, format!("the pickle holds {what}, expected a dict")));
        };
        let Some(list) = pairs
            .iter()
            .rev()
            .find(|(q, _)| self.bytes_of(*q) == Some(key))
            .map(|(_, v)| *v)
        else {
            return Err(self.err_at(stop_at, format!("the dict has no key '{k}'")));
        };
        let Some(Node::List(items) | Node::Tuple(items)) = self.node(list) else {
            let what = self.describe(list);
            return Err(self.err_at(stop_at, format!("'{k}' is {what}, not a list")));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match self.bytes_of(*v) {
                Some(b) => Ok(String::from_utf8_lossy(b).into_owned()),
                None => Err(self.err_at(
                    stop_at,
                    format!("'{k}'[{i}] is {}, not a string", self.describe(*v)),
                )),
            })
            .collect()
    }

    /// The images of the top dict: `data` and the labels under `label_key`, each below
    /// `classes`.
    pub(in crate::dataset) fn finish_with(
        mut self,
        top: Value<'a>,
        label_key: &[u8],
        classes: usize,
    ) -> Result<Images> {
        let stop_at = self.op_at;
        let key_name = String::from_utf8_lossy(label_key).into_owned();
        let Some(Node::Dict(pairs)) = self.node(top) else {
            let what = self.describe(top);
            return Err(self.err_at(
                stop_at,
                format!("the pickle holds {what}, expected a dict with 'data' and 'labels'"),
            ));
        };
        let find = |key: &[u8]| {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| self.bytes_of(*k) == Some(key))
                .map(|(_, v)| *v)
        };
        let (Some(data), Some(labels)) = (find(b"data"), find(label_key)) else {
            let keys: Vec<String> = pairs
                .iter()
                .map(|(k, _)| match self.bytes_of(*k) {
                    Some(b) => format!("'{}'", String::from_utf8_lossy(b)),
                    None => self.describe(*k),
                })
                .collect();
            return Err(self.err_at(
                stop_at,
                format!(
                    "the dict needs keys 'data' and '{key_name}'; it has [{}]",
                    keys.join(", ")
                ),
            ));
        };
        let (array, array_at) = match (data, self.node(data)) {
            (Value::Node(i), Some(Node::Array(Array::Filled(a)))) => {
                (a.clone(), self.node_at.get(i).copied().unwrap_or(stop_at))
            }
            (Value::Node(i), Some(Node::Array(Array::Empty))) => {
                let at = self.node_at.get(i).copied().unwrap_or(stop_at);
                return Err(self.err_at(at, "'data' array was never filled (no BUILD)"));
            }
            _ => {
                let what = self.describe(data);
                return Err(self.err_at(stop_at, format!("'data' is {what}, not a numpy array")));
            }
        };
        if !array.dtype.is_uint8() {
            return Err(self.err_at(
                array_at,
                format!("'data' dtype is '{}', expected uint8", array.dtype.name),
            ));
        }
        let rows = match array.dims.as_slice() {
            [n, 3072] | [n, 3, 32, 32] => usize::try_from(*n).ok(),
            _ => None,
        };
        let Some(rows) = rows else {
            return Err(self.err_at(
                array_at,
                format!(
                    "'data' shape is {:?}, expected (N, {IMAGE_BYTES})",
                    array.dims
                ),
            ));
        };
        if array.fortran && rows > 1 {
            return Err(self.err_at(array_at, "'data' is in Fortran order, expected C order"));
        }
        let (values, labels_at) = self.label_values(labels, stop_at)?;
        if values.len() != rows {
            return Err(self.err_at(
                labels_at,
                format!(
                    "'labels' has {} entries but 'data' has {rows} images",
                    values.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(rows);
        for (i, &v) in values.iter().enumerate() {
            match u16::try_from(v).ok().filter(|&l| usize::from(l) < classes) {
                Some(l) => out.push(l),
                None => {
                    return Err(self.err_at(
                        labels_at,
                        format!(
                            "{key_name}[{i}] is {v}, not a class 0..{} (the labels start here)",
                            classes - 1
                        ),
                    ))
                }
            }
        }
        let raw = array.data;
        let pixels = match raw {
            Value::Bytes(b) => b.to_vec(),
            Value::Node(i) => match self.nodes.get_mut(i) {
                Some(Node::Bytes(b)) => std::mem::take(b),
                Some(Node::Text(t)) => std::mem::take(t).into_bytes(),
                _ => return Err(self.err_at(array_at, "array data is not bytes")),
            },
            Value::Text(t) => t.as_bytes().to_vec(),
            _ => return Err(self.err_at(array_at, "array data is not bytes")),
        };
        Ok(Images {
            labels: out,
            pixels,
            side: crate::dataset::SIDE,
        })
    }
}

/// `_codecs.encode(text, encoding)`: how Python 3 pickles `bytes` under protocol 2 (as
/// latin-1 text, one code point per byte).
fn encode_text(text: &str, encoding: &str) -> std::result::Result<Vec<u8>, String> {
    match encoding.to_ascii_lowercase().replace('_', "-").as_str() {
        "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1" | "l1" => {
            // UTF-8 takes at least one byte per character: one allocation, no regrowth.
            let mut out = Vec::with_capacity(text.len());
            for c in text.chars() {
                let b = u8::try_from(u32::from(c)).map_err(|_| {
                    format!(
                        "character U+{:04X} cannot be encoded as latin-1",
                        u32::from(c)
                    )
                })?;
                out.push(b);
            }
            Ok(out)
        }
        "utf-8" | "utf8" => Ok(text.as_bytes().to_vec()),
        "ascii" if text.is_ascii() => Ok(text.as_bytes().to_vec()),
        _ => Err(format!(
            "unsupported encoding '{encoding}' for _codecs.encode"
        )),
    }
}

/// A LONG1/LONG4 payload: little-endian two's complement.
fn decode_long(bytes: &[u8]) -> Value<'static> {
    if bytes.len() > 8 {
        return Value::BigInt;
    }
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    for (dst, src) in buf.iter_mut().zip(bytes) {
        *dst = *src;
    }
    Value::Int(i64::from_le_bytes(buf))
}

/// The body of a protocol-0 STRING argument: a quoted Python-2 string literal.
pub(in crate::dataset) fn unquote_string(line: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let body = match line {
        [q @ (b'\'' | b'"'), body @ .., last] if last == q => body,
        _ => return Err("STRING argument is not quoted".into()),
    };
    let mut out = Vec::with_capacity(body.len());
    let mut it = body.iter().copied().peekable();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let Some(e) = it.next() else {
            return Err("STRING ends in a lone backslash".into());
        };
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'\\' | b'\'' | b'"' => out.push(e),
            b'\n' => {}
            b'x' => {
                let hi = it.next().and_then(hex_digit);
                let lo = it.next().and_then(hex_digit);
                match (hi, lo) {
                    (Some(h), Some(l)) => out.push(h << 4 | l),
                    _ => return Err("bad \\x escape in STRING".into()),
                }
            }
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match it.peek() {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            it.next();
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    Ok(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

/// The argument of a protocol-0 UNICODE opcode: raw-unicode-escape (latin-1 bytes with
/// `\uXXXX` and `\UXXXXXXXX` escapes).
pub(in crate::dataset) fn raw_unicode_escape(line: &[u8]) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while let Some(&b) = line.get(i) {
        let width = match (b, line.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        if width == 0 {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let digits = line
            .get(i + 2..i + 2 + width)
            .ok_or("truncated \\u escape in UNICODE")?;
        let code = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .ok_or("bad \\u escape in UNICODE")?;
        out.push(char::from_u32(code).ok_or("\\u escape is not a character")?);
        i += 2 + width;
    }
    Ok(out)
}
