//! The INFT oracle's side: EIP-712 attestations that `OracleVerifier` checks. A TEE or re-encryption
//! service holding the oracle key signs these after it has checked the data; ComputePool's devnet and
//! tests sign them with a local key.

use alloy::primitives::{Address, B256, Bytes, FixedBytes, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::{Eip712Domain, SolStruct, SolValue};

use crate::client::ChainError;

sol! {
    #[derive(Debug)]
    struct Preimage {
        bytes32 dataHash;
        bytes32 nonce;
    }

    #[derive(Debug)]
    struct TransferValidity {
        bytes32 oldDataHash;
        bytes32 newDataHash;
        address receiver;
        bytes16 sealedKey;
        bytes32 nonce;
    }
}

/// `OracleVerifier`'s EIP-712 domain on `chain_id` at `verifier`.
pub fn verifier_domain(chain_id: u64, verifier: Address) -> Eip712Domain {
    Eip712Domain::new(
        Some("ComputePool OracleVerifier".into()),
        Some("1".into()),
        Some(U256::from(chain_id)),
        Some(verifier),
        None,
    )
}

fn sign(oracle: &PrivateKeySigner, hash: B256) -> Result<Bytes, ChainError> {
    let signature = oracle
        .sign_hash_sync(&hash)
        .map_err(|e| ChainError::Contract { what: "signing an oracle attestation".into(), message: e.to_string() })?;
    Ok(Bytes::from(signature.as_bytes().to_vec()))
}

/// A proof that data with `data_hash` exists (mint, update): `abi.encode(dataHash, nonce, signature)`.
pub fn preimage_proof(oracle: &PrivateKeySigner, domain: &Eip712Domain, data_hash: B256, nonce: B256) -> Result<Bytes, ChainError> {
    let hash = Preimage { dataHash: data_hash, nonce }.eip712_signing_hash(domain);
    let signature = sign(oracle, hash)?;
    Ok((data_hash, nonce, signature).abi_encode_params().into())
}

/// A proof that `old_data_hash` was re-encrypted to `new_data_hash` for `receiver`, its key sealed as
/// `sealed_key` (transfer, clone).
pub fn transfer_proof(
    oracle: &PrivateKeySigner,
    domain: &Eip712Domain,
    old_data_hash: B256,
    new_data_hash: B256,
    receiver: Address,
    sealed_key: FixedBytes<16>,
    nonce: B256,
) -> Result<Bytes, ChainError> {
    let hash = TransferValidity { oldDataHash: old_data_hash, newDataHash: new_data_hash, receiver, sealedKey: sealed_key, nonce }
        .eip712_signing_hash(domain);
    let signature = sign(oracle, hash)?;
    Ok((old_data_hash, new_data_hash, receiver, sealed_key, nonce, signature).abi_encode_params().into())
}
