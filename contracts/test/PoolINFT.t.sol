// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {TestBase} from "./utils/TestBase.sol";
import {PoolINFT} from "../src/PoolINFT.sol";
import {OracleVerifier} from "../src/OracleVerifier.sol";
import {IERC7857} from "../src/interfaces/IERC7857.sol";
import {IERC721Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

contract PoolINFTTest is TestBase {
    uint256 constant ORACLE_KEY = 0x0AC1E;
    uint256 constant FORGER_KEY = 0xF0F0;
    address constant ALICE = address(0xA11CE);
    address constant BOB = address(0xB0B);
    address constant CAROL = address(0xCA201);

    OracleVerifier verifier;
    PoolINFT inft;

    function setUp() public {
        verifier = new OracleVerifier(vm.addr(ORACLE_KEY), address(this));
        inft = new PoolINFT("ComputePool pool", "POOL", verifier);
    }

    function _preimage(uint256 key, bytes32 dataHash, bytes32 nonce) internal view returns (bytes memory) {
        return abi.encode(dataHash, nonce, sig(key, verifier.preimageDigest(dataHash, nonce)));
    }

    function _reencryption(uint256 key, bytes32 oldHash, bytes32 newHash, address to, bytes16 sealedKey)
        internal
        view
        returns (bytes memory)
    {
        bytes32 d = verifier.transferValidityDigest(oldHash, newHash, to, sealedKey, bytes32(0));
        return abi.encode(oldHash, newHash, to, sealedKey, bytes32(0), sig(key, d));
    }

    function _one(bytes memory p) internal pure returns (bytes[] memory a) {
        a = new bytes[](1);
        a[0] = p;
    }

    function _desc() internal pure returns (string[] memory d) {
        d = new string[](1);
        d[0] = "model shards";
    }

    function _mintToAlice(bytes32 h) internal returns (uint256) {
        return inft.mint(_one(_preimage(ORACLE_KEY, h, 0)), _desc(), ALICE);
    }

    function test_mint_records_hashes() public {
        bytes32 h = keccak256("weights-v1");
        vm.expectEmit();
        bytes32[] memory hs = new bytes32[](1);
        hs[0] = h;
        emit IERC7857.Minted(1, address(this), hs, _desc());
        uint256 id = _mintToAlice(h);
        assertEq(id, 1, "token id");
        assertEq(inft.ownerOf(id), ALICE, "owner");
        assertEq(inft.dataHashesOf(id)[0], h, "data hash");
        assertTrue(keccak256(bytes(inft.dataDescriptionsOf(id)[0])) == keccak256("model shards"), "description");
        assertEq(address(inft.verifier()), address(verifier), "verifier");
    }

    function test_mint_refuses_forged_proof() public {
        bytes[] memory p = _one(_preimage(FORGER_KEY, keccak256("x"), 0));
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.InvalidProof.selector, 0));
        inft.mint(p, _desc(), ALICE);
    }

    function test_mint_refuses_replayed_proof() public {
        bytes[] memory p = _one(_preimage(ORACLE_KEY, keccak256("x"), 0));
        bytes32 proofId = verifier.preimageDigest(keccak256("x"), 0);
        inft.mint(p, _desc(), ALICE);
        assertTrue(inft.proofUsed(proofId), "proof recorded");
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.ProofAlreadyUsed.selector, proofId));
        inft.mint(p, _desc(), BOB);
    }

    function test_constructors_reject_zero_addresses() public {
        vm.expectRevert(PoolINFT.ZeroAddress.selector);
        new PoolINFT("x", "X", OracleVerifier(address(0)));
        vm.expectRevert(OracleVerifier.ZeroOracle.selector);
        new OracleVerifier(address(0), address(this));
    }

    function test_verifier_reports_malformed_signature_as_invalid() public view {
        bytes[] memory p = _one(abi.encode(keccak256("x"), bytes32(0), hex"00"));
        assertTrue(!verifier.verifyPreimage(p)[0].isValid, "a malformed signature is an invalid proof");
    }

    function test_mint_refuses_bad_shapes() public {
        vm.expectRevert(PoolINFT.EmptyProofs.selector);
        inft.mint(new bytes[](0), new string[](0), ALICE);
        bytes[] memory p = _one(_preimage(ORACLE_KEY, keccak256("x"), 0));
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.LengthMismatch.selector, 1, 0));
        inft.mint(p, new string[](0), ALICE);
        vm.expectRevert(PoolINFT.ZeroAddress.selector);
        inft.mint(p, _desc(), address(0));
    }

    function test_transfer_with_valid_proof() public {
        bytes32 h = keccak256("weights-v1");
        uint256 id = _mintToAlice(h);
        vm.prank(ALICE);
        inft.authorizeUsage(id, CAROL);
        bytes32 h2 = keccak256("weights-v1-for-bob");
        bytes[] memory p = _one(_reencryption(ORACLE_KEY, h, h2, BOB, bytes16(keccak256("sealed"))));
        vm.expectEmit();
        emit IERC7857.Transferred(id, ALICE, BOB);
        vm.prank(ALICE);
        inft.transfer(BOB, id, p);
        assertEq(inft.ownerOf(id), BOB, "new owner");
        assertEq(inft.dataHashesOf(id)[0], h2, "re-encrypted hash");
        assertEq(inft.authorizedUsersOf(id).length, 0, "authorizations cleared");
        assertTrue(!inft.isAuthorized(id, CAROL), "carol no longer authorized");
        // The same proof cannot move it again (and Bob is no longer its receiver anyway).
        vm.prank(BOB);
        vm.expectRevert();
        inft.transfer(BOB, id, p);
    }

    function test_transfer_refuses_forged_proof() public {
        bytes32 h = keccak256("weights-v1");
        uint256 id = _mintToAlice(h);
        bytes[] memory p = _one(_reencryption(FORGER_KEY, h, keccak256("evil"), BOB, 0));
        vm.prank(ALICE);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.InvalidProof.selector, 0));
        inft.transfer(BOB, id, p);
        assertEq(inft.ownerOf(id), ALICE, "still alice's");
        assertEq(inft.dataHashesOf(id)[0], h, "data unchanged");
    }

    function test_transfer_refuses_proof_for_other_receiver() public {
        bytes32 h = keccak256("weights-v1");
        uint256 id = _mintToAlice(h);
        bytes[] memory p = _one(_reencryption(ORACLE_KEY, h, keccak256("n"), CAROL, 0));
        vm.prank(ALICE);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.WrongReceiver.selector, 0, BOB, CAROL));
        inft.transfer(BOB, id, p);
    }

    function test_transfer_refuses_proof_for_other_data() public {
        bytes32 h = keccak256("weights-v1");
        uint256 id = _mintToAlice(h);
        bytes32 other = keccak256("other");
        bytes[] memory p = _one(_reencryption(ORACLE_KEY, other, keccak256("n"), BOB, 0));
        vm.prank(ALICE);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.WrongOldDataHash.selector, 0, h, other));
        inft.transfer(BOB, id, p);
    }

    function test_transfer_only_by_owner_and_not_to_zero() public {
        bytes32 h = keccak256("weights-v1");
        uint256 id = _mintToAlice(h);
        bytes[] memory p = _one(_reencryption(ORACLE_KEY, h, keccak256("n"), BOB, 0));
        vm.prank(BOB);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.NotTokenOwner.selector, id, BOB));
        inft.transfer(BOB, id, p);
        vm.prank(ALICE);
        vm.expectRevert(PoolINFT.ZeroAddress.selector);
        inft.transfer(address(0), id, p);
        vm.prank(ALICE);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.LengthMismatch.selector, 0, 1));
        inft.transfer(BOB, id, new bytes[](0));
        vm.expectRevert(abi.encodeWithSelector(IERC721Errors.ERC721NonexistentToken.selector, 99));
        inft.transfer(BOB, 99, p);
    }

    function test_plain_erc721_transfers_refused() public {
        uint256 id = _mintToAlice(keccak256("w"));
        vm.startPrank(ALICE);
        vm.expectRevert(PoolINFT.UseProofTransfer.selector);
        inft.transferFrom(ALICE, BOB, id);
        vm.expectRevert(PoolINFT.UseProofTransfer.selector);
        inft.safeTransferFrom(ALICE, BOB, id);
        vm.expectRevert(PoolINFT.UseProofTransfer.selector);
        inft.safeTransferFrom(ALICE, BOB, id, "");
        vm.stopPrank();
    }

    function test_clone_keeps_original() public {
        bytes32 h = keccak256("weights-v1");
        uint256 id = _mintToAlice(h);
        bytes32 h2 = keccak256("copy-for-bob");
        bytes[] memory p = _one(_reencryption(ORACLE_KEY, h, h2, BOB, 0));
        vm.prank(ALICE);
        uint256 copy = inft.clone(BOB, id, p);
        assertEq(copy, 2, "clone id");
        assertEq(inft.ownerOf(id), ALICE, "original stays");
        assertEq(inft.ownerOf(copy), BOB, "clone owner");
        assertEq(inft.dataHashesOf(copy)[0], h2, "clone hash");
        assertEq(inft.dataHashesOf(id)[0], h, "original hash");
        bytes[] memory forged = _one(_reencryption(FORGER_KEY, h, h2, BOB, bytes16(uint128(1))));
        vm.prank(ALICE);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.InvalidProof.selector, 0));
        inft.clone(BOB, id, forged);
    }

    function test_authorize_and_revoke_usage() public {
        uint256 id = _mintToAlice(keccak256("w"));
        vm.prank(BOB);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.NotTokenOwner.selector, id, BOB));
        inft.authorizeUsage(id, CAROL);
        vm.startPrank(ALICE);
        vm.expectEmit();
        emit IERC7857.AuthorizedUsage(id, CAROL);
        inft.authorizeUsage(id, CAROL);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.AlreadyAuthorized.selector, id, CAROL));
        inft.authorizeUsage(id, CAROL);
        vm.expectRevert(PoolINFT.ZeroAddress.selector);
        inft.authorizeUsage(id, address(0));
        assertEq(inft.authorizedUsersOf(id)[0], CAROL, "listed");
        inft.revokeUsage(id, CAROL);
        assertEq(inft.authorizedUsersOf(id).length, 0, "revoked");
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.NotAuthorized.selector, id, CAROL));
        inft.revokeUsage(id, CAROL);
        vm.stopPrank();
    }

    function test_update_with_new_preimage() public {
        bytes32 h = keccak256("w1");
        uint256 id = _mintToAlice(h);
        bytes32 h2 = keccak256("w2");
        bytes[] memory p = _one(_preimage(ORACLE_KEY, h2, bytes32(uint256(1))));
        vm.prank(BOB);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.NotTokenOwner.selector, id, BOB));
        inft.update(id, p);
        vm.prank(ALICE);
        inft.update(id, p);
        assertEq(inft.dataHashesOf(id)[0], h2, "updated");
        bytes[] memory two = new bytes[](2);
        two[0] = _preimage(ORACLE_KEY, h, bytes32(uint256(2)));
        two[1] = _preimage(ORACLE_KEY, h, bytes32(uint256(3)));
        vm.prank(ALICE);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.LengthMismatch.selector, 2, 1));
        inft.update(id, two);
        bytes[] memory forged = _one(_preimage(FORGER_KEY, h, bytes32(uint256(4))));
        vm.prank(ALICE);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.InvalidProof.selector, 0));
        inft.update(id, forged);
    }

    function test_oracle_rotation() public {
        vm.prank(ALICE);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, ALICE));
        verifier.setOracle(ALICE);
        vm.expectRevert(OracleVerifier.ZeroOracle.selector);
        verifier.setOracle(address(0));
        verifier.setOracle(vm.addr(FORGER_KEY));
        // The old oracle's proofs stop verifying; the new one's do.
        bytes[] memory old = _one(_preimage(ORACLE_KEY, keccak256("a"), 0));
        bytes[] memory fresh = _one(_preimage(FORGER_KEY, keccak256("a"), 0));
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.InvalidProof.selector, 0));
        inft.mint(old, _desc(), ALICE);
        inft.mint(fresh, _desc(), ALICE);
    }

    /// Any data hash and any non-oracle key: the oracle's proof mints, the other key's never does.
    function testFuzz_only_oracle_signatures_verify(bytes32 dataHash, bytes32 nonce, uint256 otherKey) public {
        otherKey = bound(otherKey, 1, SECP256K1_N - 1);
        vm.assume(otherKey != ORACLE_KEY);
        bytes[] memory forged = _one(_preimage(otherKey, dataHash, nonce));
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.InvalidProof.selector, 0));
        inft.mint(forged, _desc(), ALICE);
        uint256 id = inft.mint(_one(_preimage(ORACLE_KEY, dataHash, nonce)), _desc(), ALICE);
        assertEq(inft.dataHashesOf(id)[0], dataHash, "minted hash");
    }

    /// Any re-encryption the oracle attests for the right receiver moves the token; a flipped bit does not.
    function testFuzz_transfer_binds_every_field(bytes32 newHash, bytes16 sealedKey, address to, uint8 flip) public {
        vm.assume(to != address(0) && to.code.length == 0);
        bytes32 h = keccak256("w");
        uint256 id = _mintToAlice(h);
        bytes32 d = verifier.transferValidityDigest(h, newHash, to, sealedKey, 0);
        bytes memory s = sig(ORACLE_KEY, d);
        bytes32 tampered = newHash ^ bytes32(uint256(1) << (flip % 256));
        vm.prank(ALICE);
        vm.expectRevert(abi.encodeWithSelector(PoolINFT.InvalidProof.selector, 0));
        inft.transfer(to, id, _one(abi.encode(h, tampered, to, sealedKey, bytes32(0), s)));
        vm.prank(ALICE);
        inft.transfer(to, id, _one(abi.encode(h, newHash, to, sealedKey, bytes32(0), s)));
        assertEq(inft.ownerOf(id), to, "moved");
        assertEq(inft.dataHashesOf(id)[0], newHash, "new hash");
    }
}
