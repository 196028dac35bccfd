// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// What a data verifier attests for one proof of a data item's preimage (mint, update).
struct PreimageProofOutput {
    bytes32 dataHash;
    /// The attestation's EIP-712 digest: a proof is accepted once.
    bytes32 proofId;
    bool isValid;
}

/// What a data verifier attests for one re-encryption proof (transfer, clone): the data `oldDataHash` was
/// re-encrypted to `newDataHash` under a fresh key, sealed for `receiver` as `sealedKey`.
struct TransferValidityProofOutput {
    bytes32 oldDataHash;
    bytes32 newDataHash;
    address receiver;
    bytes16 sealedKey;
    bytes32 proofId;
    bool isValid;
}

/// ERC-7857's data verifier: checks proofs about encrypted data held off chain.
interface IERC7857DataVerifier {
    function verifyPreimage(bytes[] calldata proofs) external view returns (PreimageProofOutput[] memory);
    function verifyTransferValidity(bytes[] calldata proofs)
        external
        view
        returns (TransferValidityProofOutput[] memory);
}

/// ERC-7857: an NFT whose private metadata (here: a pool's model shards and keys) moves with re-encryption.
interface IERC7857 {
    event Minted(uint256 indexed tokenId, address indexed creator, bytes32[] dataHashes, string[] dataDescriptions);
    event Updated(uint256 indexed tokenId, bytes32[] oldDataHashes, bytes32[] newDataHashes);
    event Transferred(uint256 indexed tokenId, address indexed from, address indexed to);
    event Cloned(uint256 indexed tokenId, uint256 indexed newTokenId, address from, address to);
    event PublishedSealedKey(address indexed to, uint256 indexed tokenId, bytes16[] sealedKeys);
    event AuthorizedUsage(uint256 indexed tokenId, address indexed user);
    event RevokedUsage(uint256 indexed tokenId, address indexed user);

    function verifier() external view returns (IERC7857DataVerifier);
    function mint(bytes[] calldata proofs, string[] calldata dataDescriptions, address to)
        external
        returns (uint256 tokenId);
    function transfer(address to, uint256 tokenId, bytes[] calldata proofs) external;
    function clone(address to, uint256 tokenId, bytes[] calldata proofs) external returns (uint256 newTokenId);
    function authorizeUsage(uint256 tokenId, address user) external;
    function update(uint256 tokenId, bytes[] calldata proofs) external;
    function dataHashesOf(uint256 tokenId) external view returns (bytes32[] memory);
    function dataDescriptionsOf(uint256 tokenId) external view returns (string[] memory);
    function authorizedUsersOf(uint256 tokenId) external view returns (address[] memory);
}
