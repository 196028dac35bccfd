//! What the payment-rail plugins share, small enough to read at once and `no_std`: decimal amounts as
//! `u128` (the WIT carries them as strings), base64 (x402 headers), hex, and the few Ethereum ABI words the
//! GDA rail encodes by hand (addresses, unsigned and signed integers, an empty `bytes`).
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Parses a decimal amount: digits only, at most `u128::MAX`.
pub fn parse_amount(what: &str, text: &str) -> Result<u128, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} `{text}` is not a decimal amount"));
    }
    text.parse().map_err(|_| format!("{what} `{text}` does not fit in 128 bits"))
}

/// Decodes standard or URL-safe base64, padded or not (x402 clients send the standard alphabet).
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim().trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return Err(format!("`{}` is not a base64 character", c as char)),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if bits >= 6 {
        return Err("base64 of impossible length".into());
    }
    Ok(out)
}

/// Lowercase hex with a 0x prefix.
pub fn hex0x(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// A 0x-prefixed 20-byte address.
pub fn parse_address(what: &str, text: &str) -> Result<[u8; 20], String> {
    let hex = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")).ok_or_else(|| format!("{what} `{text}` is not a 0x address"))?;
    if hex.len() != 40 {
        return Err(format!("{what} `{text}` is not a 20-byte address"));
    }
    let mut out = [0u8; 20];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).ok_or_else(|| format!("{what} `{text}` is not hex"));
        out[i] = (digit(chunk[0])? * 16 + digit(chunk[1])?) as u8;
    }
    Ok(out)
}

/// Builds ABI calldata: a selector, then 32-byte head words.
pub struct Calldata(Vec<u8>);

impl Calldata {
    pub fn new(selector: [u8; 4]) -> Self {
        Self(selector.to_vec())
    }

    pub fn address(mut self, a: &[u8; 20]) -> Self {
        self.0.extend_from_slice(&[0u8; 12]);
        self.0.extend_from_slice(a);
        self
    }

    pub fn uint(mut self, v: u128) -> Self {
        self.0.extend_from_slice(&[0u8; 16]);
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A signed integer, sign-extended to 32 bytes (int96 and the like).
    pub fn int(mut self, v: i128) -> Self {
        let fill = if v < 0 { 0xff } else { 0 };
        self.0.extend_from_slice(&[fill; 16]);
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// An empty `bytes` as the last argument: its offset (`head_words` × 32) in the head, its zero length
    /// in the tail. `head_words` counts every head word, this offset included.
    pub fn empty_bytes_last(mut self, head_words: u128) -> Self {
        self = self.uint(head_words * 32);
        self.0.extend_from_slice(&[0u8; 32]);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads a returned int256-encoded signed integer that fits in i128 (an int96).
pub fn decode_int(word: &[u8]) -> Result<i128, String> {
    if word.len() < 32 {
        return Err(format!("expected a 32-byte word, got {} bytes", word.len()));
    }
    let fill = if word[16] & 0x80 != 0 { 0xff } else { 0 };
    if word[..16].iter().any(|&b| b != fill) {
        return Err("the returned integer does not fit in 128 bits".into());
    }
    let mut low = [0u8; 16];
    low.copy_from_slice(&word[16..32]);
    Ok(i128::from_be_bytes(low))
}

/// `memcmp`, which slice and string comparisons lower to. A `no_std` guest links no libc, and
/// compiler_builtins does not provide it on wasm32-wasip2 (it expects wasi-libc's), so without this the
/// component would import `env.memcmp` and fail to link as a component.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes, as for C's `memcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller promises both are valid for n bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// `bcmp`: equality only; LLVM lowers `==` on byte slices to it.
///
/// # Safety
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    unsafe { memcmp(a, b, n) }
}
