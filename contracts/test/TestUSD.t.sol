// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {TestBase} from "./utils/TestBase.sol";
import {TestUSD} from "../src/TestUSD.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

contract TestUSDTest is TestBase {
    TestUSD token;
    uint256 constant PAYER_KEY = 0xA11CE;
    address payer;
    address constant PAYEE = address(0xB0B);
    uint256 constant T0 = 1_700_000_000;

    function setUp() public {
        vm.warp(T0);
        token = new TestUSD("USD Coin", "USDC", "2", address(this));
        payer = vm.addr(PAYER_KEY);
        token.mint(payer, 1_000e6);
    }

    function _digest(bytes32 typehash, address from, address to, uint256 value, uint256 va, uint256 vb, bytes32 nonce)
        internal
        view
        returns (bytes32)
    {
        bytes32 structHash = keccak256(abi.encode(typehash, from, to, value, va, vb, nonce));
        return keccak256(abi.encodePacked("\x19\x01", token.DOMAIN_SEPARATOR(), structHash));
    }

    function _transferSig(uint256 key, address to, uint256 value, uint256 va, uint256 vb, bytes32 nonce)
        internal
        view
        returns (bytes memory)
    {
        return sig(
            key, _digest(token.TRANSFER_WITH_AUTHORIZATION_TYPEHASH(), vm.addr(key), to, value, va, vb, nonce)
        );
    }

    function test_domain_matches_eip712() public view {
        bytes32 expected = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("USD Coin"),
                keccak256("2"),
                block.chainid,
                address(token)
            )
        );
        assertEq(token.DOMAIN_SEPARATOR(), expected, "domain separator");
        assertEq(token.decimals(), 6, "decimals");
        assertTrue(keccak256(bytes(token.version())) == keccak256("2"), "version");
    }

    function test_transfer_with_authorization_moves_tokens() public {
        bytes32 nonce = keccak256("n1");
        bytes memory s = _transferSig(PAYER_KEY, PAYEE, 25e6, T0 - 1, T0 + 60, nonce);
        vm.expectEmit();
        emit TestUSD.AuthorizationUsed(payer, nonce);
        token.transferWithAuthorization(payer, PAYEE, 25e6, T0 - 1, T0 + 60, nonce, s);
        assertEq(token.balanceOf(PAYEE), 25e6, "payee balance");
        assertEq(token.balanceOf(payer), 975e6, "payer balance");
        assertTrue(token.authorizationState(payer, nonce), "nonce used");
    }

    function test_vrs_form_moves_tokens() public {
        bytes32 nonce = keccak256("vrs");
        bytes32 d = _digest(token.TRANSFER_WITH_AUTHORIZATION_TYPEHASH(), payer, PAYEE, 1e6, 0, T0 + 1, nonce);
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(PAYER_KEY, d);
        token.transferWithAuthorization(payer, PAYEE, 1e6, 0, T0 + 1, nonce, v, r, s);
        assertEq(token.balanceOf(PAYEE), 1e6, "payee balance");
    }

    function test_replay_reverts() public {
        bytes32 nonce = keccak256("n1");
        bytes memory s = _transferSig(PAYER_KEY, PAYEE, 1e6, 0, T0 + 60, nonce);
        token.transferWithAuthorization(payer, PAYEE, 1e6, 0, T0 + 60, nonce, s);
        vm.expectRevert(abi.encodeWithSelector(TestUSD.AuthorizationAlreadyUsed.selector, payer, nonce));
        token.transferWithAuthorization(payer, PAYEE, 1e6, 0, T0 + 60, nonce, s);
    }

    function test_expired_reverts() public {
        bytes memory s = _transferSig(PAYER_KEY, PAYEE, 1e6, 0, T0, bytes32(0));
        vm.expectRevert(abi.encodeWithSelector(TestUSD.AuthorizationExpired.selector, T0, T0));
        token.transferWithAuthorization(payer, PAYEE, 1e6, 0, T0, bytes32(0), s);
    }

    function test_not_yet_valid_reverts() public {
        bytes memory s = _transferSig(PAYER_KEY, PAYEE, 1e6, T0, T0 + 60, bytes32(0));
        vm.expectRevert(abi.encodeWithSelector(TestUSD.AuthorizationNotYetValid.selector, T0, T0));
        token.transferWithAuthorization(payer, PAYEE, 1e6, T0, T0 + 60, bytes32(0), s);
    }

    function test_wrong_signer_reverts() public {
        bytes32 d = _digest(token.TRANSFER_WITH_AUTHORIZATION_TYPEHASH(), payer, PAYEE, 1e6, 0, T0 + 60, 0);
        bytes memory s = sig(0xBAD, d);
        vm.expectRevert(TestUSD.InvalidSignature.selector);
        token.transferWithAuthorization(payer, PAYEE, 1e6, 0, T0 + 60, bytes32(0), s);
    }

    function test_tampered_value_reverts() public {
        bytes memory s = _transferSig(PAYER_KEY, PAYEE, 1e6, 0, T0 + 60, bytes32(0));
        vm.expectRevert(TestUSD.InvalidSignature.selector);
        token.transferWithAuthorization(payer, PAYEE, 2e6, 0, T0 + 60, bytes32(0), s);
    }

    function test_malformed_signature_reverts() public {
        vm.expectRevert(TestUSD.InvalidSignature.selector);
        token.transferWithAuthorization(payer, PAYEE, 1e6, 0, T0 + 60, bytes32(0), hex"1234");
    }

    function test_insufficient_balance_reverts() public {
        bytes memory s = _transferSig(PAYER_KEY, PAYEE, 2_000e6, 0, T0 + 60, bytes32(0));
        vm.expectRevert();
        token.transferWithAuthorization(payer, PAYEE, 2_000e6, 0, T0 + 60, bytes32(0), s);
        assertTrue(!token.authorizationState(payer, bytes32(0)), "a failed transfer leaves the nonce unused");
    }

    function test_receive_with_authorization_only_by_payee() public {
        bytes32 nonce = keccak256("r");
        bytes32 d = _digest(token.RECEIVE_WITH_AUTHORIZATION_TYPEHASH(), payer, PAYEE, 3e6, 0, T0 + 60, nonce);
        bytes memory s = sig(PAYER_KEY, d);
        vm.expectRevert(abi.encodeWithSelector(TestUSD.CallerMustBePayee.selector, address(this), PAYEE));
        token.receiveWithAuthorization(payer, PAYEE, 3e6, 0, T0 + 60, nonce, s);
        vm.prank(PAYEE);
        token.receiveWithAuthorization(payer, PAYEE, 3e6, 0, T0 + 60, nonce, s);
        assertEq(token.balanceOf(PAYEE), 3e6, "payee balance");
    }

    function test_receive_signature_does_not_work_as_transfer() public {
        // The two typehashes differ, so a receive authorization cannot be front-run as a transfer.
        bytes32 d = _digest(token.RECEIVE_WITH_AUTHORIZATION_TYPEHASH(), payer, PAYEE, 3e6, 0, T0 + 60, 0);
        bytes memory s = sig(PAYER_KEY, d);
        vm.expectRevert(TestUSD.InvalidSignature.selector);
        token.transferWithAuthorization(payer, PAYEE, 3e6, 0, T0 + 60, bytes32(0), s);
    }

    function test_cancel_authorization() public {
        bytes32 nonce = keccak256("c");
        bytes32 cd = keccak256(
            abi.encodePacked(
                "\x19\x01",
                token.DOMAIN_SEPARATOR(),
                keccak256(abi.encode(token.CANCEL_AUTHORIZATION_TYPEHASH(), payer, nonce))
            )
        );
        bytes memory cs = sig(PAYER_KEY, cd);
        // A cancel signed by someone else is refused.
        vm.expectRevert(TestUSD.InvalidSignature.selector);
        token.cancelAuthorization(payer, nonce, sig(0xBAD, cd));
        vm.expectEmit();
        emit TestUSD.AuthorizationCanceled(payer, nonce);
        token.cancelAuthorization(payer, nonce, cs);
        bytes memory s = _transferSig(PAYER_KEY, PAYEE, 1e6, 0, T0 + 60, nonce);
        vm.expectRevert(abi.encodeWithSelector(TestUSD.AuthorizationAlreadyUsed.selector, payer, nonce));
        token.transferWithAuthorization(payer, PAYEE, 1e6, 0, T0 + 60, nonce, s);
        vm.expectRevert(abi.encodeWithSelector(TestUSD.AuthorizationAlreadyUsed.selector, payer, nonce));
        token.cancelAuthorization(payer, nonce, cs);
    }

    function test_only_owner_mints() public {
        vm.prank(PAYEE);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, PAYEE));
        token.mint(PAYEE, 1);
    }

    /// Any key, amount, window and nonce: a valid authorization settles exactly once.
    function testFuzz_authorization_settles_once(uint256 key, uint256 value, uint256 lifetime, bytes32 nonce) public {
        key = bound(key, 1, SECP256K1_N - 1);
        value = bound(value, 0, 1_000_000e6);
        lifetime = bound(lifetime, 1, 365 days);
        address from = vm.addr(key);
        vm.assume(from != PAYEE);
        token.mint(from, value);
        bytes memory s = _transferSig(key, PAYEE, value, T0 - 1, T0 + lifetime, nonce);
        token.transferWithAuthorization(from, PAYEE, value, T0 - 1, T0 + lifetime, nonce, s);
        assertEq(token.balanceOf(PAYEE), value, "payee balance");
        assertEq(token.balanceOf(from), 0, "payer balance");
        vm.expectRevert(abi.encodeWithSelector(TestUSD.AuthorizationAlreadyUsed.selector, from, nonce));
        token.transferWithAuthorization(from, PAYEE, value, T0 - 1, T0 + lifetime, nonce, s);
    }

    /// Any moment at or past validBefore is too late.
    function testFuzz_expired_at_any_later_time(uint256 late) public {
        late = bound(late, 0, 10 * 365 days);
        bytes memory s = _transferSig(PAYER_KEY, PAYEE, 1, 0, T0 + 10, bytes32(0));
        vm.warp(T0 + 10 + late);
        vm.expectRevert(abi.encodeWithSelector(TestUSD.AuthorizationExpired.selector, T0 + 10, T0 + 10 + late));
        token.transferWithAuthorization(payer, PAYEE, 1, 0, T0 + 10, bytes32(0), s);
    }
}
