// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC721} from "@openzeppelin/contracts/token/ERC721/ERC721.sol";
import {
    IERC7857,
    IERC7857DataVerifier,
    PreimageProofOutput,
    TransferValidityProofOutput
} from "./interfaces/IERC7857.sol";

/// @title PoolINFT — a ComputePool pool as an ERC-7857 intelligent NFT.
/// @notice The token's private data (encrypted model shards, pool keys) lives off chain; on chain are its
/// hashes. Every change of the data or its holder carries proofs checked by the verifier: a preimage proof
/// to mint or update, a re-encryption proof per item to transfer or clone, bound to the receiver. Plain
/// ERC-721 transfers are refused, since they would hand over data the receiver cannot decrypt.
contract PoolINFT is ERC721, IERC7857 {
    IERC7857DataVerifier private immutable _verifier;
    uint256 public nextTokenId = 1;

    mapping(uint256 tokenId => bytes32[]) private _dataHashes;
    mapping(uint256 tokenId => string[]) private _dataDescriptions;
    mapping(uint256 tokenId => address[]) private _authorizedUsers;
    mapping(uint256 tokenId => mapping(address user => bool)) private _usageAuthorized;
    /// Each attestation is accepted once, so a proof seen on chain cannot be replayed.
    mapping(bytes32 proofId => bool) public proofUsed;

    error EmptyProofs();
    error LengthMismatch(uint256 proofs, uint256 expected);
    error InvalidProof(uint256 index);
    error ProofAlreadyUsed(bytes32 proofId);
    error WrongOldDataHash(uint256 index, bytes32 expected, bytes32 got);
    error WrongReceiver(uint256 index, address expected, address got);
    error NotTokenOwner(uint256 tokenId, address caller);
    error ZeroAddress();
    error AlreadyAuthorized(uint256 tokenId, address user);
    error NotAuthorized(uint256 tokenId, address user);
    error UseProofTransfer();

    constructor(string memory name_, string memory symbol_, IERC7857DataVerifier verifier_) ERC721(name_, symbol_) {
        if (address(verifier_) == address(0)) revert ZeroAddress();
        _verifier = verifier_;
    }

    function verifier() external view returns (IERC7857DataVerifier) {
        return _verifier;
    }

    function mint(bytes[] calldata proofs, string[] calldata dataDescriptions, address to)
        external
        returns (uint256 tokenId)
    {
        if (to == address(0)) revert ZeroAddress();
        bytes32[] memory hashes = _checkPreimages(proofs);
        if (dataDescriptions.length != proofs.length) revert LengthMismatch(proofs.length, dataDescriptions.length);
        tokenId = nextTokenId++;
        _dataHashes[tokenId] = hashes;
        string[] storage descriptions = _dataDescriptions[tokenId];
        for (uint256 i = 0; i < dataDescriptions.length; i++) {
            descriptions.push(dataDescriptions[i]);
        }
        _safeMint(to, tokenId);
        emit Minted(tokenId, msg.sender, hashes, dataDescriptions);
    }

    function transfer(address to, uint256 tokenId, bytes[] calldata proofs) external {
        address from = _requireOwner(tokenId);
        if (to == address(0)) revert ZeroAddress();
        (bytes32[] memory newHashes, bytes16[] memory sealedKeys) = _checkReencryption(tokenId, to, proofs);
        _dataHashes[tokenId] = newHashes;
        _clearAuthorizations(tokenId);
        // ERC721's own move (approvals cleared, Transfer event); the proof path bypasses the public block.
        _transfer(from, to, tokenId);
        emit Transferred(tokenId, from, to);
        emit PublishedSealedKey(to, tokenId, sealedKeys);
    }

    function clone(address to, uint256 tokenId, bytes[] calldata proofs) external returns (uint256 newTokenId) {
        address from = _requireOwner(tokenId);
        if (to == address(0)) revert ZeroAddress();
        (bytes32[] memory newHashes, bytes16[] memory sealedKeys) = _checkReencryption(tokenId, to, proofs);
        newTokenId = nextTokenId++;
        _dataHashes[newTokenId] = newHashes;
        _dataDescriptions[newTokenId] = _dataDescriptions[tokenId];
        _safeMint(to, newTokenId);
        emit Cloned(tokenId, newTokenId, from, to);
        emit PublishedSealedKey(to, newTokenId, sealedKeys);
    }

    function authorizeUsage(uint256 tokenId, address user) external {
        _requireOwner(tokenId);
        if (user == address(0)) revert ZeroAddress();
        if (_usageAuthorized[tokenId][user]) revert AlreadyAuthorized(tokenId, user);
        _usageAuthorized[tokenId][user] = true;
        _authorizedUsers[tokenId].push(user);
        emit AuthorizedUsage(tokenId, user);
    }

    function revokeUsage(uint256 tokenId, address user) external {
        _requireOwner(tokenId);
        if (!_usageAuthorized[tokenId][user]) revert NotAuthorized(tokenId, user);
        _usageAuthorized[tokenId][user] = false;
        address[] storage users = _authorizedUsers[tokenId];
        for (uint256 i = 0; i < users.length; i++) {
            if (users[i] == user) {
                users[i] = users[users.length - 1];
                users.pop();
                break;
            }
        }
        emit RevokedUsage(tokenId, user);
    }

    function update(uint256 tokenId, bytes[] calldata proofs) external {
        _requireOwner(tokenId);
        bytes32[] memory newHashes = _checkPreimages(proofs);
        if (newHashes.length != _dataHashes[tokenId].length) {
            revert LengthMismatch(newHashes.length, _dataHashes[tokenId].length);
        }
        bytes32[] memory oldHashes = _dataHashes[tokenId];
        _dataHashes[tokenId] = newHashes;
        emit Updated(tokenId, oldHashes, newHashes);
    }

    function dataHashesOf(uint256 tokenId) external view returns (bytes32[] memory) {
        _requireOwned(tokenId);
        return _dataHashes[tokenId];
    }

    function dataDescriptionsOf(uint256 tokenId) external view returns (string[] memory) {
        _requireOwned(tokenId);
        return _dataDescriptions[tokenId];
    }

    function authorizedUsersOf(uint256 tokenId) external view returns (address[] memory) {
        _requireOwned(tokenId);
        return _authorizedUsers[tokenId];
    }

    function isAuthorized(uint256 tokenId, address user) external view returns (bool) {
        return _usageAuthorized[tokenId][user];
    }

    /// Plain ERC-721 moves are refused: use `transfer` with proofs.
    function transferFrom(address, address, uint256) public pure override {
        revert UseProofTransfer();
    }

    function safeTransferFrom(address, address, uint256, bytes memory) public pure override {
        revert UseProofTransfer();
    }

    function _requireOwner(uint256 tokenId) private view returns (address owner) {
        owner = _requireOwned(tokenId);
        if (owner != msg.sender) revert NotTokenOwner(tokenId, msg.sender);
    }

    function _checkPreimages(bytes[] calldata proofs) private returns (bytes32[] memory hashes) {
        if (proofs.length == 0) revert EmptyProofs();
        PreimageProofOutput[] memory out = _verifier.verifyPreimage(proofs);
        if (out.length != proofs.length) revert LengthMismatch(out.length, proofs.length);
        hashes = new bytes32[](out.length);
        for (uint256 i = 0; i < out.length; i++) {
            if (!out[i].isValid) revert InvalidProof(i);
            _useProof(out[i].proofId);
            hashes[i] = out[i].dataHash;
        }
    }

    function _checkReencryption(uint256 tokenId, address to, bytes[] calldata proofs)
        private
        returns (bytes32[] memory newHashes, bytes16[] memory sealedKeys)
    {
        bytes32[] storage current = _dataHashes[tokenId];
        if (proofs.length != current.length) revert LengthMismatch(proofs.length, current.length);
        TransferValidityProofOutput[] memory out = _verifier.verifyTransferValidity(proofs);
        if (out.length != proofs.length) revert LengthMismatch(out.length, proofs.length);
        newHashes = new bytes32[](out.length);
        sealedKeys = new bytes16[](out.length);
        for (uint256 i = 0; i < out.length; i++) {
            if (!out[i].isValid) revert InvalidProof(i);
            if (out[i].oldDataHash != current[i]) revert WrongOldDataHash(i, current[i], out[i].oldDataHash);
            if (out[i].receiver != to) revert WrongReceiver(i, to, out[i].receiver);
            _useProof(out[i].proofId);
            newHashes[i] = out[i].newDataHash;
            sealedKeys[i] = out[i].sealedKey;
        }
    }

    function _useProof(bytes32 proofId) private {
        if (proofUsed[proofId]) revert ProofAlreadyUsed(proofId);
        proofUsed[proofId] = true;
    }

    function _clearAuthorizations(uint256 tokenId) private {
        address[] storage users = _authorizedUsers[tokenId];
        for (uint256 i = 0; i < users.length; i++) {
            _usageAuthorized[tokenId][users[i]] = false;
        }
        delete _authorizedUsers[tokenId];
    }
}
