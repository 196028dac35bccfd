//! Solidity ABI encoding of one function call from a JSON ABI entry and JSON argument values, as a
//! KeeperHub `web3/write-contract` node describes it (`abi`, `abiFunction`, `functionArgs`).
//!
//! Types: `address`, `bool`, `uint<N>`, `int<N>`, `bytes<N>`, `bytes`, `string`, `T[]`, `T[k]` and tuples
//! (with `components`), nested freely. Values: numbers as decimal (or 0x-hex) strings or JSON integers,
//! addresses and byte strings as 0x-hex, bools as `true`/`false` (or those words as strings), arrays as
//! JSON arrays, tuples as JSON objects keyed by component name or as arrays in order. Every value is range
//! checked against its type (an `int96` flow rate that does not fit is refused, not truncated).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde_json::Value;
use sha3::{Digest, Keccak256};

/// A Solidity type, parsed from an ABI `inputs` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SolType {
    Address,
    Bool,
    /// `uint<bits>`.
    Uint(u16),
    /// `int<bits>`.
    Int(u16),
    /// `bytes<n>`, 1 ≤ n ≤ 32.
    FixedBytes(u8),
    Bytes,
    String,
    Array(alloc::boxed::Box<SolType>),
    FixedArray(alloc::boxed::Box<SolType>, usize),
    /// Components with their names (for values given as objects).
    Tuple(Vec<(String, SolType)>),
}

impl SolType {
    /// Parses one ABI parameter (`{"type": …, "components": […]}`).
    pub fn of_param(param: &Value) -> Result<Self, String> {
        let ty = param.get("type").and_then(Value::as_str).ok_or("an ABI parameter has no `type`")?;
        Self::parse(ty, param.get("components"))
    }

    fn parse(ty: &str, components: Option<&Value>) -> Result<Self, String> {
        // Array suffixes bind last: `uint256[2][]` is a dynamic array of `uint256[2]`.
        if let Some(open) = ty.rfind('[') {
            let inner = Self::parse(&ty[..open], components)?;
            let size = ty[open + 1..].strip_suffix(']').ok_or_else(|| format!("bad array type `{ty}`"))?;
            return Ok(if size.is_empty() {
                SolType::Array(alloc::boxed::Box::new(inner))
            } else {
                let n: usize = size.parse().map_err(|_| format!("bad array size in `{ty}`"))?;
                SolType::FixedArray(alloc::boxed::Box::new(inner), n)
            });
        }
        let bits = |digits: &str, default: u16| -> Result<u16, String> {
            if digits.is_empty() {
                return Ok(default);
            }
            match digits.parse::<u16>() {
                Ok(b) if b % 8 == 0 && (8..=256).contains(&b) => Ok(b),
                _ => Err(format!("bad integer type `{ty}`")),
            }
        };
        Ok(match ty {
            "address" => SolType::Address,
            "bool" => SolType::Bool,
            "bytes" => SolType::Bytes,
            "string" => SolType::String,
            "tuple" => {
                let list = components.and_then(Value::as_array).ok_or("a tuple parameter has no `components`")?;
                let mut fields = Vec::with_capacity(list.len());
                for c in list {
                    let name = c.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
                    fields.push((name, Self::of_param(c)?));
                }
                SolType::Tuple(fields)
            }
            _ if ty.starts_with("uint") => SolType::Uint(bits(&ty[4..], 256)?),
            _ if ty.starts_with("int") => SolType::Int(bits(&ty[3..], 256)?),
            _ if ty.starts_with("bytes") => match ty[5..].parse::<u8>() {
                Ok(n) if (1..=32).contains(&n) => SolType::FixedBytes(n),
                _ => return Err(format!("bad bytes type `{ty}`")),
            },
            _ => return Err(format!("unsupported ABI type `{ty}`")),
        })
    }

    /// The canonical name in a signature (`(address,uint256)[]` for an array of tuples).
    pub fn canonical(&self) -> String {
        match self {
            SolType::Address => "address".into(),
            SolType::Bool => "bool".into(),
            SolType::Uint(b) => format!("uint{b}"),
            SolType::Int(b) => format!("int{b}"),
            SolType::FixedBytes(n) => format!("bytes{n}"),
            SolType::Bytes => "bytes".into(),
            SolType::String => "string".into(),
            SolType::Array(t) => format!("{}[]", t.canonical()),
            SolType::FixedArray(t, n) => format!("{}[{n}]", t.canonical()),
            SolType::Tuple(fields) => {
                let inner: Vec<String> = fields.iter().map(|(_, t)| t.canonical()).collect();
                format!("({})", inner.join(","))
            }
        }
    }

    fn is_dynamic(&self) -> bool {
        match self {
            SolType::Bytes | SolType::String | SolType::Array(_) => true,
            SolType::FixedArray(t, _) => t.is_dynamic(),
            SolType::Tuple(fields) => fields.iter().any(|(_, t)| t.is_dynamic()),
            _ => false,
        }
    }

    /// Bytes this type takes in its parent's head.
    fn head_len(&self) -> usize {
        if self.is_dynamic() {
            return 32;
        }
        match self {
            SolType::FixedArray(t, n) => t.head_len() * n,
            SolType::Tuple(fields) => fields.iter().map(|(_, t)| t.head_len()).sum(),
            _ => 32,
        }
    }
}

/// One function of a JSON ABI: its name and parameter types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    pub inputs: Vec<(String, SolType)>,
}

impl Function {
    /// Finds `name` in `abi` (a JSON array of ABI entries). Overloads are refused: a node names a
    /// function by name only, so the call would be ambiguous.
    pub fn find(abi: &Value, name: &str) -> Result<Self, String> {
        let entries = abi.as_array().ok_or("the ABI is not a JSON array")?;
        let mut found = entries
            .iter()
            .filter(|e| e.get("type").and_then(Value::as_str).unwrap_or("function") == "function")
            .filter(|e| e.get("name").and_then(Value::as_str) == Some(name));
        let entry = found.next().ok_or_else(|| format!("the ABI has no function `{name}`"))?;
        if found.next().is_some() {
            return Err(format!("the ABI overloads `{name}`; a node cannot say which one it calls"));
        }
        let mut inputs = Vec::new();
        for p in entry.get("inputs").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
            let pname = p.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
            inputs.push((pname, SolType::of_param(p)?));
        }
        Ok(Self { name: name.to_string(), inputs })
    }

    /// `name(type,…)`: the selector's preimage.
    pub fn signature(&self) -> String {
        let types: Vec<String> = self.inputs.iter().map(|(_, t)| t.canonical()).collect();
        format!("{}({})", self.name, types.join(","))
    }

    pub fn selector(&self) -> [u8; 4] {
        let digest = Keccak256::digest(self.signature().as_bytes());
        [digest[0], digest[1], digest[2], digest[3]]
    }

    /// The calldata: selector, then the arguments encoded as one tuple.
    pub fn encode_call(&self, args: &[Value]) -> Result<Vec<u8>, String> {
        if args.len() != self.inputs.len() {
            return Err(format!("{} takes {} arguments, {} given", self.signature(), self.inputs.len(), args.len()));
        }
        let mut out = self.selector().to_vec();
        let types: Vec<&SolType> = self.inputs.iter().map(|(_, t)| t).collect();
        let values: Vec<&Value> = args.iter().collect();
        let names: Vec<&str> = self.inputs.iter().map(|(n, _)| n.as_str()).collect();
        out.extend(encode_sequence(&types, &values, &names)?);
        Ok(out)
    }
}

/// Head/tail encoding of a sequence (a tuple's fields, an array's elements).
fn encode_sequence(types: &[&SolType], values: &[&Value], names: &[&str]) -> Result<Vec<u8>, String> {
    let head_len: usize = types.iter().map(|t| t.head_len()).sum();
    let mut head = Vec::with_capacity(head_len);
    let mut tail = Vec::new();
    for (i, (ty, value)) in types.iter().zip(values).enumerate() {
        let encoded = encode(ty, value).map_err(|e| match names.get(i).filter(|n| !n.is_empty()) {
            Some(name) => format!("`{name}`: {e}"),
            None => format!("[{i}]: {e}"),
        })?;
        if ty.is_dynamic() {
            head.extend_from_slice(&uint_word((head_len + tail.len()) as u128));
            tail.extend(encoded);
        } else {
            head.extend(encoded);
        }
    }
    head.extend(tail);
    Ok(head)
}

fn encode(ty: &SolType, value: &Value) -> Result<Vec<u8>, String> {
    match ty {
        SolType::Address => {
            let text = value.as_str().ok_or_else(|| format!("expected an address, got {value}"))?;
            let bytes = parse_hex(text).filter(|b| b.len() == 20).ok_or_else(|| format!("`{text}` is not a 0x-prefixed 20-byte address"))?;
            let mut word = [0u8; 32];
            word[12..].copy_from_slice(&bytes);
            Ok(word.to_vec())
        }
        SolType::Bool => {
            let b = match value {
                Value::Bool(b) => *b,
                Value::String(s) if s == "true" => true,
                Value::String(s) if s == "false" => false,
                _ => return Err(format!("expected a bool, got {value}")),
            };
            Ok(uint_word(u128::from(b)).to_vec())
        }
        SolType::Uint(bits) => {
            let (negative, magnitude) = parse_integer(value)?;
            if negative && magnitude != [0u8; 32] {
                return Err(format!("uint{bits} cannot be negative: {value}"));
            }
            if leading_zero_bits(&magnitude) < 256 - usize::from(*bits) {
                return Err(format!("{value} does not fit in uint{bits}"));
            }
            Ok(magnitude.to_vec())
        }
        SolType::Int(bits) => {
            let (negative, magnitude) = parse_integer(value)?;
            // |v| ≤ 2^(bits-1) - 1, or 2^(bits-1) when negative.
            let limit_bits = 256 - usize::from(*bits) + 1;
            let fits = leading_zero_bits(&magnitude) >= limit_bits || (negative && is_power_of_two_at(&magnitude, usize::from(*bits) - 1));
            if !fits {
                return Err(format!("{value} does not fit in int{bits}"));
            }
            Ok(if negative { twos_complement(&magnitude) } else { magnitude }.to_vec())
        }
        SolType::FixedBytes(n) => {
            let text = value.as_str().ok_or_else(|| format!("expected bytes{n} as 0x-hex, got {value}"))?;
            let bytes = parse_hex(text).filter(|b| b.len() == usize::from(*n)).ok_or_else(|| format!("`{text}` is not {n} bytes of 0x-hex"))?;
            let mut word = [0u8; 32];
            word[..bytes.len()].copy_from_slice(&bytes);
            Ok(word.to_vec())
        }
        SolType::Bytes => {
            let text = value.as_str().ok_or_else(|| format!("expected bytes as 0x-hex, got {value}"))?;
            let bytes = parse_hex(text).ok_or_else(|| format!("`{text}` is not 0x-hex"))?;
            Ok(length_prefixed(&bytes))
        }
        SolType::String => {
            let text = value.as_str().ok_or_else(|| format!("expected a string, got {value}"))?;
            Ok(length_prefixed(text.as_bytes()))
        }
        SolType::Array(inner) => {
            let items = value.as_array().ok_or_else(|| format!("expected an array, got {value}"))?;
            let mut out = uint_word(items.len() as u128).to_vec();
            out.extend(encode_elements(inner, items)?);
            Ok(out)
        }
        SolType::FixedArray(inner, n) => {
            let items = value.as_array().ok_or_else(|| format!("expected an array, got {value}"))?;
            if items.len() != *n {
                return Err(format!("expected {n} elements, got {}", items.len()));
            }
            encode_elements(inner, items)
        }
        SolType::Tuple(fields) => {
            let values: Vec<&Value> = match value {
                Value::Array(items) if items.len() == fields.len() => items.iter().collect(),
                Value::Array(items) => return Err(format!("expected {} tuple fields, got {}", fields.len(), items.len())),
                Value::Object(map) => {
                    if let Some(extra) = map.keys().find(|k| !fields.iter().any(|(n, _)| n == *k)) {
                        return Err(format!("the tuple has no field `{extra}`"));
                    }
                    let mut values = Vec::with_capacity(fields.len());
                    for (name, _) in fields {
                        values.push(map.get(name).ok_or_else(|| format!("the tuple's field `{name}` is missing"))?);
                    }
                    values
                }
                _ => return Err(format!("expected a tuple (object or array), got {value}")),
            };
            let types: Vec<&SolType> = fields.iter().map(|(_, t)| t).collect();
            let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
            encode_sequence(&types, &values, &names)
        }
    }
}

fn encode_elements(inner: &SolType, items: &[Value]) -> Result<Vec<u8>, String> {
    let types: Vec<&SolType> = items.iter().map(|_| inner).collect();
    let values: Vec<&Value> = items.iter().collect();
    encode_sequence(&types, &values, &[])
}

fn uint_word(v: u128) -> [u8; 32] {
    let mut word = [0u8; 32];
    word[16..].copy_from_slice(&v.to_be_bytes());
    word
}

fn length_prefixed(bytes: &[u8]) -> Vec<u8> {
    let mut out = uint_word(bytes.len() as u128).to_vec();
    out.extend_from_slice(bytes);
    out.resize(32 + bytes.len().div_ceil(32) * 32, 0);
    out
}

/// 0x-prefixed hex (an even number of digits; `0x` alone is empty).
pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let digits = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X"))?;
    if digits.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    digits.as_bytes().chunks(2).map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?)).collect()
}

/// Lowercase 0x-hex.
pub fn hex0x(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// A sign and a 256-bit big-endian magnitude, from a JSON integer or a decimal / 0x-hex string.
fn parse_integer(value: &Value) -> Result<(bool, [u8; 32]), String> {
    let text = match value {
        Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return Err(format!("expected an integer (a decimal string), got {value}")),
    };
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    if let Some(hex) = digits.strip_prefix("0x") {
        if hex.is_empty() || hex.len() > 64 {
            return Err(format!("`{text}` is not a 256-bit hex number"));
        }
        let padded = format!("0x{}{hex}", "0".repeat(64 - hex.len()));
        let bytes = parse_hex(&padded).ok_or_else(|| format!("`{text}` is not hex"))?;
        let mut word = [0u8; 32];
        word.copy_from_slice(&bytes);
        return Ok((negative, word));
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{text}` is not a decimal integer"));
    }
    let mut word = [0u8; 32];
    for d in digits.bytes() {
        // word = word × 10 + d, failing on overflow past 256 bits.
        let mut carry = u16::from(d - b'0');
        for byte in word.iter_mut().rev() {
            let v = u16::from(*byte) * 10 + carry;
            *byte = v as u8;
            carry = v >> 8;
        }
        if carry != 0 {
            return Err(format!("`{text}` does not fit in 256 bits"));
        }
    }
    Ok((negative, word))
}

fn leading_zero_bits(word: &[u8; 32]) -> usize {
    let mut n = 0;
    for b in word {
        if *b == 0 {
            n += 8;
        } else {
            return n + b.leading_zeros() as usize;
        }
    }
    n
}

/// Whether `word` is exactly 2^`bit`.
fn is_power_of_two_at(word: &[u8; 32], bit: usize) -> bool {
    let mut expected = [0u8; 32];
    expected[31 - bit / 8] = 1 << (bit % 8);
    *word == expected
}

fn twos_complement(word: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut carry = 1u16;
    for i in (0..32).rev() {
        let v = u16::from(!word[i]) + carry;
        out[i] = v as u8;
        carry = v >> 8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hex(s: &str) -> Vec<u8> {
        parse_hex(&format!("0x{}", s.split_whitespace().collect::<String>())).unwrap()
    }

    #[test]
    fn selectors_match_the_known_ones() {
        // The superfluid-gda rail's hand-checked selectors, and ERC-20 transfer.
        let gda = json!([
            {"type":"function","name":"updateMemberUnits","inputs":[{"type":"address"},{"type":"address"},{"type":"uint128"},{"type":"bytes"}]},
            {"type":"function","name":"distributeFlow","inputs":[{"type":"address"},{"type":"address"},{"type":"address"},{"type":"int96"},{"type":"bytes"}]},
            {"type":"function","name":"transfer","inputs":[{"type":"address"},{"type":"uint256"}]}
        ]);
        assert_eq!(Function::find(&gda, "updateMemberUnits").unwrap().selector(), [0x39, 0x8c, 0x74, 0xe1]);
        assert_eq!(Function::find(&gda, "distributeFlow").unwrap().selector(), [0x5a, 0x6c, 0x6d, 0xbc]);
        assert_eq!(Function::find(&gda, "transfer").unwrap().selector(), [0xa9, 0x05, 0x9c, 0xbb]);
    }

    #[test]
    fn static_and_empty_bytes_encode_like_the_rail() {
        let abi = json!([{"type":"function","name":"updateMemberUnits","inputs":[
            {"name":"pool","type":"address"},{"name":"memberAddress","type":"address"},{"name":"newUnits","type":"uint128"},{"name":"userData","type":"bytes"}]}]);
        let f = Function::find(&abi, "updateMemberUnits").unwrap();
        let data = f
            .encode_call(&[json!("0x00000000000000000000000000000000000000aa"), json!("0x00000000000000000000000000000000000000bb"), json!("3"), json!("0x")])
            .unwrap();
        let expected = hex(
            "398c74e1
             00000000000000000000000000000000000000000000000000000000000000aa
             00000000000000000000000000000000000000000000000000000000000000bb
             0000000000000000000000000000000000000000000000000000000000000003
             0000000000000000000000000000000000000000000000000000000000000080
             0000000000000000000000000000000000000000000000000000000000000000",
        );
        assert_eq!(data, expected);
    }

    #[test]
    fn dynamic_arrays_of_bytes_and_strings_and_a_tuple() {
        // mint(bytes[],string[],address) with one proof and one description, checked by hand against
        // the ABI spec's head/tail rules.
        let abi = json!([{"type":"function","name":"mint","inputs":[
            {"name":"proofs","type":"bytes[]"},{"name":"dataDescriptions","type":"string[]"},{"name":"to","type":"address"}]}]);
        let f = Function::find(&abi, "mint").unwrap();
        assert_eq!(f.signature(), "mint(bytes[],string[],address)");
        let data = f.encode_call(&[json!(["0x0102"]), json!(["ab"]), json!("0x00000000000000000000000000000000000000cc")]).unwrap();
        let expected = hex(
            "0000000000000000000000000000000000000000000000000000000000000060
             00000000000000000000000000000000000000000000000000000000000000e0
             00000000000000000000000000000000000000000000000000000000000000cc
             0000000000000000000000000000000000000000000000000000000000000001
             0000000000000000000000000000000000000000000000000000000000000020
             0000000000000000000000000000000000000000000000000000000000000002
             0102000000000000000000000000000000000000000000000000000000000000
             0000000000000000000000000000000000000000000000000000000000000001
             0000000000000000000000000000000000000000000000000000000000000020
             0000000000000000000000000000000000000000000000000000000000000002
             6162000000000000000000000000000000000000000000000000000000000000",
        );
        assert_eq!(&data[4..], &expected[..]);

        // createPool(address,address,(bool,bool)): a static tuple inline, from an object.
        let abi = json!([{"type":"function","name":"createPool","inputs":[{"name":"token","type":"address"},{"name":"admin","type":"address"},
            {"name":"config","type":"tuple","components":[{"name":"transferabilityForUnitsOwner","type":"bool"},{"name":"distributionFromAnyAddress","type":"bool"}]}]}]);
        let f = Function::find(&abi, "createPool").unwrap();
        assert_eq!(f.signature(), "createPool(address,address,(bool,bool))");
        let a = "0x00000000000000000000000000000000000000aa";
        let data = f.encode_call(&[json!(a), json!(a), json!({"transferabilityForUnitsOwner": false, "distributionFromAnyAddress": true})]).unwrap();
        assert_eq!(data.len(), 4 + 4 * 32);
        assert_eq!(data[4 + 3 * 32 + 31], 1);
        assert_eq!(data[4 + 2 * 32 + 31], 0);
        let err = f.encode_call(&[json!(a), json!(a), json!({"transferabilityForUnitsOwner": false})]).unwrap_err();
        assert!(err.contains("distributionFromAnyAddress"), "{err}");
    }

    #[test]
    fn integers_are_range_checked_and_negatives_are_twos_complement() {
        let enc = |ty: &str, v: Value| encode(&SolType::parse(ty, None).unwrap(), &v);
        assert_eq!(enc("int96", json!("-1")).unwrap(), [0xffu8; 32].to_vec());
        let max96 = "39614081257132168796771975167"; // 2^95 - 1
        assert!(enc("int96", json!(max96)).is_ok());
        assert!(enc("int96", json!("39614081257132168796771975168")).unwrap_err().contains("int96"));
        assert!(enc("int96", json!("-39614081257132168796771975168")).is_ok(), "-2^95 fits");
        assert!(enc("uint128", json!("340282366920938463463374607431768211456")).unwrap_err().contains("uint128"));
        assert!(enc("uint8", json!("-1")).unwrap_err().contains("negative"));
        assert_eq!(enc("uint256", json!(1000)).unwrap(), uint_word(1000).to_vec());
        assert_eq!(enc("uint256", json!("0x3e8")).unwrap(), uint_word(1000).to_vec());
        let max = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
        assert_eq!(enc("uint256", json!(max)).unwrap(), [0xffu8; 32].to_vec());
        assert!(enc("uint256", json!(format!("{max}0"))).unwrap_err().contains("256 bits"));
        assert!(enc("uint256", json!("12a")).is_err());
        assert!(enc("uint256", json!(1.5)).is_err());
    }

    #[test]
    fn bad_values_say_which_argument() {
        let abi = json!([{"type":"function","name":"proposeBreach","inputs":[
            {"name":"operator","type":"address"},{"name":"amount","type":"uint256"},{"name":"evidence","type":"bytes32"}]}]);
        let f = Function::find(&abi, "proposeBreach").unwrap();
        let a = "0x00000000000000000000000000000000000000aa";
        let err = f.encode_call(&[json!(a), json!("1"), json!("0x12")]).unwrap_err();
        assert!(err.starts_with("`evidence`:"), "{err}");
        let err = f.encode_call(&[json!("0x12"), json!("1"), json!("0x12")]).unwrap_err();
        assert!(err.starts_with("`operator`:"), "{err}");
        assert!(f.encode_call(&[json!(a)]).unwrap_err().contains("takes 3 arguments"));
        assert!(Function::find(&abi, "vote").unwrap_err().contains("no function"));
    }
}
