// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {TestBase} from "./utils/TestBase.sol";
import {Coalition} from "../src/Coalition.sol";
import {TestUSD} from "../src/TestUSD.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

contract CoalitionTest is TestBase {
    TestUSD token;
    Coalition coalition;
    address constant TREASURY = address(0x7EA5);
    address constant OP1 = address(0x1001);
    address constant OP2 = address(0x1002);
    address constant OP3 = address(0x1003);
    address constant V1 = address(0x2001);
    address constant V2 = address(0x2002);
    address constant V3 = address(0x2003);
    uint256 constant MIN_STAKE = 100e6;
    uint64 constant PERIOD = 1 hours;

    function setUp() public {
        vm.warp(1_700_000_000);
        token = new TestUSD("USD Coin", "USDC", "2", address(this));
        coalition = new Coalition(token, MIN_STAKE, PERIOD, TREASURY, address(this));
        address[3] memory ops = [OP1, OP2, OP3];
        for (uint256 i = 0; i < 3; i++) {
            token.mint(ops[i], 1_000e6);
            vm.prank(ops[i]);
            token.approve(address(coalition), type(uint256).max);
        }
        coalition.addVoter(V1);
        coalition.addVoter(V2);
        coalition.addVoter(V3);
        coalition.setThreshold(2);
    }

    function _join(address op, uint128 units, uint256 stake) internal {
        vm.prank(op);
        coalition.join(keccak256(abi.encode(op)), units, stake);
    }

    function _poolOf123() internal {
        _join(OP1, 1, MIN_STAKE);
        _join(OP2, 2, MIN_STAKE);
        _join(OP3, 3, MIN_STAKE);
    }

    function test_join_records_member_and_units() public {
        vm.expectEmit();
        emit Coalition.MemberJoined(OP1, keccak256(abi.encode(OP1)), 1, 150e6);
        _join(OP1, 1, 150e6);
        _join(OP2, 2, MIN_STAKE);
        Coalition.Member memory m = coalition.memberOf(OP1);
        assertEq(m.peerId, keccak256(abi.encode(OP1)), "peer id");
        assertEq(m.units, 1, "units");
        assertEq(m.stake, 150e6, "stake");
        assertTrue(m.active, "active");
        assertEq(coalition.totalUnits(), 3, "total units");
        assertEq(coalition.operators().length, 2, "operators");
        assertEq(token.balanceOf(address(coalition)), 250e6, "stake held");
    }

    function test_join_reverts() public {
        vm.prank(OP1);
        vm.expectRevert(Coalition.ZeroUnits.selector);
        coalition.join(0, 0, MIN_STAKE);
        vm.prank(OP1);
        vm.expectRevert(abi.encodeWithSelector(Coalition.StakeTooLow.selector, MIN_STAKE - 1, MIN_STAKE));
        coalition.join(0, 1, MIN_STAKE - 1);
        _join(OP1, 1, MIN_STAKE);
        vm.prank(OP1);
        vm.expectRevert(abi.encodeWithSelector(Coalition.AlreadyMember.selector, OP1));
        coalition.join(0, 1, MIN_STAKE);
        // Without an allowance the stake cannot be taken.
        vm.prank(address(0xDEAD));
        vm.expectRevert();
        coalition.join(0, 1, MIN_STAKE);
    }

    function test_leave_returns_stake() public {
        _join(OP1, 1, 150e6);
        vm.expectEmit();
        emit Coalition.MemberLeft(OP1, 150e6);
        vm.prank(OP1);
        coalition.leaveCoalition();
        assertEq(token.balanceOf(OP1), 1_000e6, "stake back");
        assertEq(coalition.totalUnits(), 0, "units gone");
        assertEq(coalition.operators().length, 0, "no operators");
        vm.prank(OP1);
        vm.expectRevert(abi.encodeWithSelector(Coalition.NotMember.selector, OP1));
        coalition.leaveCoalition();
    }

    function test_add_stake_and_set_units() public {
        _join(OP1, 1, MIN_STAKE);
        vm.prank(OP1);
        coalition.addStake(5e6);
        assertEq(coalition.memberOf(OP1).stake, MIN_STAKE + 5e6, "stake");
        vm.prank(OP1);
        vm.expectRevert(Coalition.ZeroAmount.selector);
        coalition.addStake(0);
        vm.prank(OP2);
        vm.expectRevert(abi.encodeWithSelector(Coalition.NotMember.selector, OP2));
        coalition.addStake(1);
        vm.expectEmit();
        emit Coalition.UnitsChanged(OP1, 1, 7);
        coalition.setUnits(OP1, 7);
        assertEq(coalition.totalUnits(), 7, "total units");
        vm.expectRevert(Coalition.ZeroUnits.selector);
        coalition.setUnits(OP1, 0);
        vm.prank(OP1);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, OP1));
        coalition.setUnits(OP1, 9);
    }

    function test_two_of_three_slashes() public {
        _poolOf123();
        vm.prank(V1);
        uint256 id = coalition.proposeBreach(OP2, 40e6, keccak256("wrong activations"));
        assertEq(coalition.memberOf(OP2).stake, MIN_STAKE, "one vote does not slash");
        vm.expectEmit();
        emit Coalition.Slashed(id, OP2, 40e6, MIN_STAKE - 40e6);
        vm.prank(V2);
        coalition.vote(id);
        assertEq(coalition.memberOf(OP2).stake, MIN_STAKE - 40e6, "slashed");
        assertEq(token.balanceOf(TREASURY), 40e6, "to the slash recipient");
        assertTrue(coalition.breachOf(id).executed, "executed");
        // The quorum is spent: a third vote is refused, and the operator may leave again.
        vm.prank(V3);
        vm.expectRevert(abi.encodeWithSelector(Coalition.BreachExecuted.selector, id));
        coalition.vote(id);
        vm.prank(OP2);
        coalition.leaveCoalition();
        assertEq(token.balanceOf(OP2), 1_000e6 - 40e6, "rest returned");
    }

    function test_one_of_three_does_not_slash() public {
        _poolOf123();
        vm.prank(V1);
        uint256 id = coalition.proposeBreach(OP3, 40e6, 0);
        assertEq(coalition.memberOf(OP3).stake, MIN_STAKE, "not slashed");
        assertEq(coalition.breachOf(id).votes, 1, "one vote");
        assertTrue(!coalition.breachOf(id).executed, "open");
        // An accused operator cannot leave while the vote is open.
        vm.prank(OP3);
        vm.expectRevert(abi.encodeWithSelector(Coalition.OpenBreaches.selector, OP3, 1));
        coalition.leaveCoalition();
        // After the deadline the vote is closed without a slash, and the operator is free to go.
        vm.warp(block.timestamp + PERIOD + 1);
        uint64 deadline = coalition.breachOf(id).deadline;
        vm.prank(V2);
        vm.expectRevert(abi.encodeWithSelector(Coalition.VotingClosed.selector, id, deadline));
        coalition.vote(id);
        coalition.closeExpired(id);
        assertEq(coalition.memberOf(OP3).stake, MIN_STAKE, "still not slashed");
        vm.prank(OP3);
        coalition.leaveCoalition();
        assertEq(token.balanceOf(OP3), 1_000e6, "full stake back");
    }

    function test_repeated_vote_does_not_count_twice() public {
        _poolOf123();
        vm.prank(V1);
        uint256 id = coalition.proposeBreach(OP1, 10e6, 0);
        vm.prank(V1);
        vm.expectRevert(abi.encodeWithSelector(Coalition.AlreadyVoted.selector, id, V1));
        coalition.vote(id);
        assertEq(coalition.breachOf(id).votes, 1, "still one vote");
        assertEq(coalition.memberOf(OP1).stake, MIN_STAKE, "not slashed");
    }

    function test_slash_is_capped_at_stake() public {
        _poolOf123();
        vm.prank(V1);
        uint256 id = coalition.proposeBreach(OP1, 1_000_000e6, 0);
        vm.prank(V3);
        coalition.vote(id);
        assertEq(coalition.memberOf(OP1).stake, 0, "all of it");
        assertEq(token.balanceOf(TREASURY), MIN_STAKE, "no more than the stake");
    }

    function test_breach_reverts() public {
        _poolOf123();
        vm.prank(OP1);
        vm.expectRevert(abi.encodeWithSelector(Coalition.NotVoter.selector, OP1));
        coalition.proposeBreach(OP2, 1, 0);
        vm.prank(V1);
        vm.expectRevert(abi.encodeWithSelector(Coalition.NotMember.selector, address(0xBEEF)));
        coalition.proposeBreach(address(0xBEEF), 1, 0);
        vm.prank(V1);
        vm.expectRevert(Coalition.ZeroAmount.selector);
        coalition.proposeBreach(OP2, 0, 0);
        vm.prank(V1);
        vm.expectRevert(abi.encodeWithSelector(Coalition.UnknownBreach.selector, 42));
        coalition.vote(42);
        vm.prank(OP1);
        vm.expectRevert(abi.encodeWithSelector(Coalition.NotVoter.selector, OP1));
        coalition.vote(1);
        vm.expectRevert(abi.encodeWithSelector(Coalition.UnknownBreach.selector, 42));
        coalition.closeExpired(42);
        vm.prank(V1);
        uint256 id = coalition.proposeBreach(OP2, 1, 0);
        uint64 deadline = coalition.breachOf(id).deadline;
        vm.expectRevert(abi.encodeWithSelector(Coalition.VotingStillOpen.selector, id, deadline));
        coalition.closeExpired(id);
        vm.prank(V2);
        coalition.vote(id);
        vm.warp(deadline + 1);
        vm.expectRevert(abi.encodeWithSelector(Coalition.BreachExecuted.selector, id));
        coalition.closeExpired(id);
    }

    function test_voter_admin() public {
        vm.expectRevert(abi.encodeWithSelector(Coalition.AlreadyVoter.selector, V1));
        coalition.addVoter(V1);
        vm.expectRevert(Coalition.ZeroAddress.selector);
        coalition.addVoter(address(0));
        vm.expectRevert(abi.encodeWithSelector(Coalition.BadThreshold.selector, 4, 3));
        coalition.setThreshold(4);
        vm.expectRevert(abi.encodeWithSelector(Coalition.BadThreshold.selector, 0, 3));
        coalition.setThreshold(0);
        coalition.setThreshold(3);
        // Removing a voter may not leave fewer voters than the threshold.
        vm.expectRevert(abi.encodeWithSelector(Coalition.BadThreshold.selector, 3, 2));
        coalition.removeVoter(V3);
        coalition.setThreshold(2);
        vm.expectEmit();
        emit Coalition.VoterRemoved(V3);
        coalition.removeVoter(V3);
        assertEq(coalition.voterCount(), 2, "two voters");
        vm.expectRevert(abi.encodeWithSelector(Coalition.NotVoter.selector, V3));
        coalition.removeVoter(V3);
        vm.prank(V1);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, V1));
        coalition.addVoter(V3);
        vm.expectRevert(Coalition.ZeroAddress.selector);
        coalition.setSlashRecipient(address(0));
        coalition.setSlashRecipient(V1);
        assertEq(coalition.slashRecipient(), V1, "recipient");
    }

    function test_no_threshold_no_breach() public {
        Coalition fresh = new Coalition(token, 0, PERIOD, TREASURY, address(this));
        fresh.addVoter(V1);
        vm.prank(OP1);
        fresh.join(0, 1, 0);
        vm.prank(V1);
        vm.expectRevert(abi.encodeWithSelector(Coalition.BadThreshold.selector, 0, 1));
        fresh.proposeBreach(OP1, 1, 0);
    }

    function test_constructor_rejects_zero_addresses() public {
        vm.expectRevert(Coalition.ZeroAddress.selector);
        new Coalition(token, 0, PERIOD, address(0), address(this));
    }

    /// Any k-of-n: exactly the k-th distinct vote slashes, and only once.
    function testFuzz_k_of_n(uint8 nRaw, uint8 kRaw, uint256 amount) public {
        uint32 n = uint32(bound(nRaw, 1, 12));
        uint32 k = uint32(bound(kRaw, 1, n));
        amount = bound(amount, 1, MIN_STAKE);
        Coalition c = new Coalition(token, MIN_STAKE, PERIOD, TREASURY, address(this));
        for (uint32 i = 0; i < n; i++) {
            c.addVoter(address(uint160(0x9000 + i)));
        }
        c.setThreshold(k);
        vm.prank(OP1);
        token.approve(address(c), MIN_STAKE);
        vm.prank(OP1);
        c.join(0, 1, MIN_STAKE);
        vm.prank(address(0x9000));
        uint256 id = c.proposeBreach(OP1, amount, 0);
        for (uint32 i = 1; i < k; i++) {
            assertEq(c.memberOf(OP1).stake, MIN_STAKE, "not before k votes");
            // The same voter twice never advances the count.
            vm.prank(address(uint160(0x9000 + i - 1)));
            vm.expectRevert(abi.encodeWithSelector(Coalition.AlreadyVoted.selector, id, address(uint160(0x9000 + i - 1))));
            c.vote(id);
            vm.prank(address(uint160(0x9000 + i)));
            c.vote(id);
        }
        assertEq(c.memberOf(OP1).stake, MIN_STAKE - amount, "slashed at k votes");
        assertEq(c.breachOf(id).votes, k, "k votes");
    }
}
