//! AXL peer ids: ed25519 public keys written as 64 hex characters, and the shortened form the
//! daemon's `/recv` reports senders by.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// Bytes in an ed25519 public key.
pub const PEER_ID_LEN: usize = 32;

/// Hex characters in a written peer id.
pub const PEER_ID_HEX_LEN: usize = 2 * PEER_ID_LEN;

/// A peer on the AXL network: the node's ed25519 public key, as `/topology` reports it
/// (`our_public_key`) and as `POST /send` takes it (`X-Destination-Peer-Id`).
///
/// Parsing checks the form only (64 hex characters, either case; written back in lower case), not
/// that the bytes are a point on the curve: the daemon cannot reach a key that is not one, and
/// answers such a send like any unreachable peer.
///
/// **Senders are reported shortened.** The daemon names the sender of a received message by the
/// key it recovers from the sender's Yggdrasil IPv6 address, which holds only about the first 113
/// bits of the key: `/recv` reports [`reported_form`](Self::reported_form), not the full key.
/// Compare a received sender with a known peer through [`same_node`](Self::same_node). Sending to
/// a reported id reaches the same node (the daemon routes by that address).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AxlPeerId([u8; PEER_ID_LEN]);

/// Why a string is not an AXL peer id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    /// Not 64 characters long.
    #[error("an AXL peer id is {PEER_ID_HEX_LEN} hex characters (an ed25519 public key), got {len} characters")]
    WrongLength {
        /// Characters (not bytes) in the rejected string.
        len: usize,
    },
    /// A character that is not `0-9 a-f A-F`.
    #[error("an AXL peer id is {PEER_ID_HEX_LEN} hex characters, but character {position} is {character:?}")]
    NotHex {
        /// Index of the first bad character, counted from 0.
        position: usize,
        /// The bad character.
        character: char,
    },
}

impl AxlPeerId {
    /// Wraps 32 key bytes.
    pub const fn from_bytes(bytes: [u8; PEER_ID_LEN]) -> Self {
        AxlPeerId(bytes)
    }

    /// Parses 64 hex characters (upper or lower case, nothing around them).
    ///
    /// Errors: [`PeerIdError::WrongLength`] for any other length, [`PeerIdError::NotHex`] for a
    /// character outside `0-9 a-f A-F`. Never echoes the input, so a hostile header cannot flood logs.
    pub fn parse(text: &str) -> Result<Self, PeerIdError> {
        if text.len() != PEER_ID_HEX_LEN {
            return Err(PeerIdError::WrongLength { len: text.chars().count() });
        }
        if let Some((position, character)) = text.chars().enumerate().find(|(_, c)| !c.is_ascii_hexdigit()) {
            return Err(PeerIdError::NotHex { position, character });
        }
        let mut bytes = [0u8; PEER_ID_LEN];
        hex::decode_to_slice(text, &mut bytes).expect("64 ASCII hex digits decode to 32 bytes");
        Ok(AxlPeerId(bytes))
    }

    /// The key bytes.
    pub const fn as_bytes(&self) -> &[u8; PEER_ID_LEN] {
        &self.0
    }

    /// The id as the daemon's API writes it: 64 lower-case hex characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex characters and an ellipsis, for log lines and error messages.
    pub fn short(&self) -> String {
        format!("{}…", hex::encode(&self.0[..4]))
    }

    /// The node's Yggdrasil IPv6 address (`our_ipv6` in `/topology`), derived from the key as
    /// Yggdrasil does: `0x02`, the number of leading 1 bits of the inverted key, then the inverted
    /// key's next 112 bits after those ones and the first 0. `None` for the all-zero key, which
    /// Yggdrasil cannot address.
    pub fn yggdrasil_address(&self) -> Option<Ipv6Addr> {
        address_for_key(&self.0).map(Ipv6Addr::from)
    }

    /// The id `/recv` reports (`X-From-Peer-Id`) for a message this peer sent: the key as far as its
    /// Yggdrasil address carries it (its leading zero bits, the first 1 bit and the 112 bits after
    /// it), every later bit set to 1. Equal to `self` for a key already in that form, and for the
    /// all-zero key.
    pub fn reported_form(&self) -> AxlPeerId {
        match address_for_key(&self.0) {
            Some(address) => AxlPeerId(key_for_address(&address)),
            None => *self,
        }
    }

    /// Whether `self` and `other` name the same AXL node, either being a full key or a sender id as
    /// `/recv` reports it: they are equal in [`reported_form`](Self::reported_form). As strong as
    /// Yggdrasil's own binding of addresses to keys.
    pub fn same_node(&self, other: &AxlPeerId) -> bool {
        self.reported_form() == other.reported_form()
    }
}

impl fmt::Display for AxlPeerId {
    /// The full 64 lower-case hex characters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for AxlPeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AxlPeerId({})", self.to_hex())
    }
}

impl FromStr for AxlPeerId {
    type Err = PeerIdError;

    fn from_str(s: &str) -> Result<Self, PeerIdError> {
        AxlPeerId::parse(s)
    }
}

impl TryFrom<String> for AxlPeerId {
    type Error = PeerIdError;

    fn try_from(s: String) -> Result<Self, PeerIdError> {
        AxlPeerId::parse(&s)
    }
}

impl From<AxlPeerId> for String {
    fn from(id: AxlPeerId) -> String {
        id.to_hex()
    }
}

impl serde::Serialize for AxlPeerId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for AxlPeerId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        AxlPeerId::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Bit `index` (0 = most significant bit of byte 0) of `bytes`.
fn bit(bytes: &[u8], index: usize) -> u8 {
    (bytes[index / 8] >> (7 - index % 8)) & 1
}

/// Yggdrasil's `address.AddrForKey` (yggdrasil-go `src/address/address.go`).
fn address_for_key(key: &[u8; PEER_ID_LEN]) -> Option<[u8; 16]> {
    let inverted = key.map(|b| !b);
    let total_bits = 8 * PEER_ID_LEN;
    let ones = (0..total_bits).take_while(|&i| bit(&inverted, i) == 1).count();
    // The count must fit in the address's one-byte field, and a 0 bit must follow it.
    if ones >= total_bits {
        return None;
    }
    let mut address = [0u8; 16];
    address[0] = 0x02;
    address[1] = u8::try_from(ones).ok()?;
    // After the ones and their terminating 0, whole bytes of the inverted key fill the 14 bytes left.
    let first = ones + 1;
    let whole_bytes = ((total_bits - first) / 8).min(14);
    for j in 0..whole_bytes * 8 {
        address[2 + j / 8] |= bit(&inverted, first + j) << (7 - j % 8);
    }
    Some(address)
}

/// Yggdrasil's `Address.GetKey`: the partial key an address carries, unknown bits set to 1.
fn key_for_address(address: &[u8; 16]) -> [u8; PEER_ID_LEN] {
    let mut inverted = [0u8; PEER_ID_LEN];
    let ones = usize::from(address[1]);
    for i in 0..ones.min(8 * PEER_ID_LEN) {
        inverted[i / 8] |= 0x80 >> (i % 8);
    }
    for i in 16..128 {
        let key_index = ones + 1 + (i - 16);
        if key_index >= 8 * PEER_ID_LEN {
            break;
        }
        inverted[key_index / 8] |= bit(address, i) << (7 - key_index % 8);
    }
    inverted.map(|b| !b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "ab12cd34ef56ab12cd34ef56ab12cd34ef56ab12cd34ef56ab12cd34ef56ab12";

    #[test]
    fn parses_and_writes_64_hex_characters() {
        let id = AxlPeerId::parse(KEY).expect("valid");
        assert_eq!(id.to_hex(), KEY);
        assert_eq!(id.to_string(), KEY);
        assert_eq!(id.short(), "ab12cd34…");
        assert_eq!(AxlPeerId::parse(&KEY.to_uppercase()), Ok(id));
        assert_eq!(KEY.parse::<AxlPeerId>(), Ok(id));
        assert_eq!(id.as_bytes()[0], 0xab);
    }

    #[test]
    fn malformed_ids_are_rejected_with_the_reason() {
        assert_eq!(AxlPeerId::parse(""), Err(PeerIdError::WrongLength { len: 0 }));
        assert_eq!(AxlPeerId::parse(&KEY[..63]), Err(PeerIdError::WrongLength { len: 63 }));
        assert_eq!(AxlPeerId::parse(&format!("{KEY}0")), Err(PeerIdError::WrongLength { len: 65 }));
        let mut bad = KEY.to_string();
        bad.replace_range(10..11, "g");
        assert_eq!(AxlPeerId::parse(&bad), Err(PeerIdError::NotHex { position: 10, character: 'g' }));
        // 62 ASCII characters and one 2-byte character: 64 bytes, but not 64 hex digits.
        let unicode = format!("{}é", &KEY[..62]);
        assert_eq!(unicode.len(), 64);
        assert_eq!(AxlPeerId::parse(&unicode), Err(PeerIdError::NotHex { position: 62, character: 'é' }));
        let spaced = format!(" {}", &KEY[1..]);
        assert_eq!(AxlPeerId::parse(&spaced), Err(PeerIdError::NotHex { position: 0, character: ' ' }));
        assert!(PeerIdError::WrongLength { len: 3 }.to_string().contains("64 hex characters"));
    }

    #[test]
    fn serde_uses_the_hex_form() {
        let id = AxlPeerId::parse(KEY).expect("valid");
        assert_eq!(serde_json::to_string(&id).expect("serializes"), format!("\"{KEY}\""));
        let back: AxlPeerId = serde_json::from_str(&format!("\"{KEY}\"")).expect("deserializes");
        assert_eq!(back, id);
        assert!(serde_json::from_str::<AxlPeerId>("\"abc\"").is_err());
    }

    #[test]
    fn reported_form_keeps_113_bits_of_a_key_with_a_leading_one() {
        // Leading bit 1: zero leading ones in the inverted key, so the address carries bits 1..=112
        // and GetKey restores bits 0..=112; bits 113.. come back as 1.
        let mut bytes = [0u8; PEER_ID_LEN];
        bytes[0] = 0x80;
        let reported = AxlPeerId::from_bytes(bytes).reported_form();
        let mut expected = [0u8; PEER_ID_LEN];
        expected[0] = 0x80;
        expected[14] = 0x7f;
        expected[15..].fill(0xff);
        assert_eq!(reported, AxlPeerId::from_bytes(expected));
        assert_eq!(
            AxlPeerId::from_bytes(bytes).yggdrasil_address(),
            Some("200:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse::<Ipv6Addr>().expect("valid address"))
        );
    }

    #[test]
    fn reported_form_of_a_key_with_leading_zeros() {
        // 12 leading zero bits: the address says 12 ones, then carries the 112 bits after the 13th.
        let mut bytes = [0x55u8; PEER_ID_LEN];
        bytes[0] = 0x00;
        bytes[1] = 0x0f;
        let id = AxlPeerId::from_bytes(bytes);
        let address = id.yggdrasil_address().expect("addressable").octets();
        assert_eq!(&address[..2], &[0x02, 12]);
        // Inverted key from bit 13 on: !0x0f = 0xf0 → bits 13..16 are "000", then !0x55 = 0xaa…
        assert_eq!(address[2], 0b0001_0101);
        let reported = id.reported_form();
        let known_bits = 12 + 1 + 112;
        for i in 0..8 * PEER_ID_LEN {
            let expected = if i < known_bits { bit(&bytes, i) } else { 1 };
            assert_eq!(bit(reported.as_bytes(), i), expected, "bit {i}");
        }
    }

    #[test]
    fn the_all_zero_key_has_no_address() {
        let zero = AxlPeerId::from_bytes([0; PEER_ID_LEN]);
        assert_eq!(zero.yggdrasil_address(), None);
        assert_eq!(zero.reported_form(), zero);
        let mostly_zero = AxlPeerId::from_bytes({
            let mut b = [0; PEER_ID_LEN];
            b[31] = 1;
            b
        });
        assert_eq!(mostly_zero.yggdrasil_address().map(|a| a.octets()[1]), Some(255));
        assert_eq!(mostly_zero.reported_form(), mostly_zero);
    }

    proptest! {
        #[test]
        fn reported_form_routes_to_the_same_address(bytes in any::<[u8; PEER_ID_LEN]>()) {
            let id = AxlPeerId::from_bytes(bytes);
            let reported = id.reported_form();
            prop_assert_eq!(reported.yggdrasil_address(), id.yggdrasil_address());
            prop_assert_eq!(reported.reported_form(), reported);
            prop_assert!(id.same_node(&reported) && reported.same_node(&id));
            // Random keys have far fewer than 143 leading zeros, so all 112 address bits are used.
            let leading_zeros = (0..256).take_while(|&i| bit(&bytes, i) == 0).count();
            prop_assume!(leading_zeros < 143);
            let known_bits = leading_zeros + 1 + 112;
            for i in 0..known_bits {
                prop_assert_eq!(bit(reported.as_bytes(), i), bit(&bytes, i));
            }
            for i in known_bits..256 {
                prop_assert_eq!(bit(reported.as_bytes(), i), 1);
            }
        }

        #[test]
        fn parsing_never_panics(text in ".{0,80}") {
            let _ = AxlPeerId::parse(&text);
        }

        #[test]
        fn hex_round_trips(bytes in any::<[u8; PEER_ID_LEN]>()) {
            let id = AxlPeerId::from_bytes(bytes);
            prop_assert_eq!(AxlPeerId::parse(&id.to_hex()), Ok(id));
        }
    }
}
