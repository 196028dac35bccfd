// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {
    IERC7857DataVerifier,
    PreimageProofOutput,
    TransferValidityProofOutput
} from "./interfaces/IERC7857.sol";

/// @title OracleVerifier — ERC-7857 proofs as ECDSA attestations of one configured oracle key.
/// @notice The oracle (a TEE or a trusted re-encryption service) signs EIP-712 statements:
///   Preimage(bytes32 dataHash, bytes32 nonce)
///   TransferValidity(bytes32 oldDataHash, bytes32 newDataHash, address receiver, bytes16 sealedKey, bytes32 nonce)
/// A proof is `abi.encode(<the fields above>, bytes signature)`. A proof signed by any other key, or for
/// other fields, comes back `isValid = false`; the INFT refuses it. Replay is stopped by the INFT, which
/// accepts each `proofId` (the EIP-712 digest) once.
contract OracleVerifier is IERC7857DataVerifier, EIP712, Ownable {
    bytes32 public constant PREIMAGE_TYPEHASH = keccak256("Preimage(bytes32 dataHash,bytes32 nonce)");
    bytes32 public constant TRANSFER_VALIDITY_TYPEHASH = keccak256(
        "TransferValidity(bytes32 oldDataHash,bytes32 newDataHash,address receiver,bytes16 sealedKey,bytes32 nonce)"
    );

    address public oracle;

    event OracleChanged(address indexed previousOracle, address indexed newOracle);

    error ZeroOracle();

    constructor(address oracle_, address owner_) EIP712("ComputePool OracleVerifier", "1") Ownable(owner_) {
        if (oracle_ == address(0)) revert ZeroOracle();
        oracle = oracle_;
        emit OracleChanged(address(0), oracle_);
    }

    /// Rotates the oracle key; proofs signed by the old key stop verifying at once.
    function setOracle(address newOracle) external onlyOwner {
        if (newOracle == address(0)) revert ZeroOracle();
        emit OracleChanged(oracle, newOracle);
        oracle = newOracle;
    }

    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function preimageDigest(bytes32 dataHash, bytes32 nonce) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(PREIMAGE_TYPEHASH, dataHash, nonce)));
    }

    function transferValidityDigest(
        bytes32 oldDataHash,
        bytes32 newDataHash,
        address receiver,
        bytes16 sealedKey,
        bytes32 nonce
    ) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(abi.encode(TRANSFER_VALIDITY_TYPEHASH, oldDataHash, newDataHash, receiver, sealedKey, nonce))
        );
    }

    function verifyPreimage(bytes[] calldata proofs) external view returns (PreimageProofOutput[] memory out) {
        out = new PreimageProofOutput[](proofs.length);
        for (uint256 i = 0; i < proofs.length; i++) {
            (bytes32 dataHash, bytes32 nonce, bytes memory signature) = abi.decode(proofs[i], (bytes32, bytes32, bytes));
            bytes32 digest = preimageDigest(dataHash, nonce);
            out[i] = PreimageProofOutput({dataHash: dataHash, proofId: digest, isValid: _signedByOracle(digest, signature)});
        }
    }

    function verifyTransferValidity(bytes[] calldata proofs)
        external
        view
        returns (TransferValidityProofOutput[] memory out)
    {
        out = new TransferValidityProofOutput[](proofs.length);
        for (uint256 i = 0; i < proofs.length; i++) {
            (
                bytes32 oldDataHash,
                bytes32 newDataHash,
                address receiver,
                bytes16 sealedKey,
                bytes32 nonce,
                bytes memory signature
            ) = abi.decode(proofs[i], (bytes32, bytes32, address, bytes16, bytes32, bytes));
            bytes32 digest = transferValidityDigest(oldDataHash, newDataHash, receiver, sealedKey, nonce);
            out[i] = TransferValidityProofOutput({
                oldDataHash: oldDataHash,
                newDataHash: newDataHash,
                receiver: receiver,
                sealedKey: sealedKey,
                proofId: digest,
                isValid: _signedByOracle(digest, signature)
            });
        }
    }

    function _signedByOracle(bytes32 digest, bytes memory signature) private view returns (bool) {
        // tryRecover: a malformed signature is an invalid proof, not a revert of the whole batch.
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, signature);
        return err == ECDSA.RecoverError.NoError && signer == oracle;
    }
}
