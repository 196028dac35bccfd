//! EIP-3009 authorizations for the test token (and USDC itself): the EIP-712 message a payer signs so that
//! anyone may submit `transferWithAuthorization` for it. x402 vouchers are these.

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::{Eip712Domain, SolStruct};

use crate::client::ChainError;

sol! {
    /// EIP-3009's signed message, field for field.
    #[derive(Debug)]
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }
}

/// A token's EIP-712 domain: (name, version) as the token reports them, the chain, the token's address.
pub fn token_domain(name: &str, version: &str, chain_id: u64, token: Address) -> Eip712Domain {
    Eip712Domain::new(
        Some(name.to_string().into()),
        Some(version.to_string().into()),
        Some(U256::from(chain_id)),
        Some(token),
        None,
    )
}

/// A signed authorization, ready for `transferWithAuthorization(from, to, value, validAfter, validBefore,
/// nonce, signature)`.
#[derive(Clone, Debug)]
pub struct SignedAuthorization {
    pub message: TransferWithAuthorization,
    /// 65 bytes: r, s, v (27 or 28).
    pub signature: Bytes,
}

/// Signs `to` receiving `value` from the signer, valid strictly between `valid_after` and `valid_before`
/// (unix seconds), once per `nonce`.
pub fn sign_transfer(
    signer: &PrivateKeySigner,
    domain: &Eip712Domain,
    to: Address,
    value: U256,
    valid_after: u64,
    valid_before: u64,
    nonce: B256,
) -> Result<SignedAuthorization, ChainError> {
    let message = TransferWithAuthorization {
        from: signer.address(),
        to,
        value,
        validAfter: U256::from(valid_after),
        validBefore: U256::from(valid_before),
        nonce,
    };
    let hash = message.eip712_signing_hash(domain);
    let signature = signer
        .sign_hash_sync(&hash)
        .map_err(|e| ChainError::Contract { what: "signing an EIP-3009 authorization".into(), message: e.to_string() })?;
    Ok(SignedAuthorization { message, signature: Bytes::from(signature.as_bytes().to_vec()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::keccak256;

    #[test]
    fn typehash_matches_the_standard() {
        assert_eq!(
            TransferWithAuthorization::eip712_type_hash(&TransferWithAuthorization {
                from: Address::ZERO,
                to: Address::ZERO,
                value: U256::ZERO,
                validAfter: U256::ZERO,
                validBefore: U256::ZERO,
                nonce: B256::ZERO,
            }),
            keccak256(
                "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
            )
        );
    }

    #[test]
    fn signature_recovers_to_the_payer() {
        let signer = PrivateKeySigner::random();
        let domain = token_domain("USD Coin", "2", 16602, Address::repeat_byte(7));
        let auth = sign_transfer(&signer, &domain, Address::repeat_byte(1), U256::from(5), 0, 10, B256::repeat_byte(3)).unwrap();
        let sig = alloy::primitives::Signature::try_from(auth.signature.as_ref()).unwrap();
        let hash = auth.message.eip712_signing_hash(&domain);
        assert_eq!(sig.recover_address_from_prehash(&hash).unwrap(), signer.address());
        // Another domain (another chain) gives another digest: the signature does not carry over.
        let other = token_domain("USD Coin", "2", 1, Address::repeat_byte(7));
        assert_ne!(sig.recover_address_from_prehash(&auth.message.eip712_signing_hash(&other)).unwrap(), signer.address());
    }
}
