// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title Coalition — a pool's operators, their units and stakes, and k-of-n votes on breaches.
/// @notice Operators join with a peer id (their worker's ed25519 key), a number of GDA units (their share of
/// the pool's compute, hence of its stream) and a stake in `stakeToken`. Registered voters (coalition voter
/// plugins, each with a host-held key) vote on breach subjects; a vote counts once per voter, and when
/// `threshold` voters agree the offender's stake is slashed to `slashRecipient` at once. An operator with an
/// open breach against it cannot leave, so a vote cannot be dodged by withdrawing the stake.
contract Coalition is Ownable {
    using SafeERC20 for IERC20;

    struct Member {
        bytes32 peerId;
        uint128 units;
        uint256 stake;
        bool active;
        /// Open (not executed, not expired) breach subjects naming this operator.
        uint32 openBreaches;
    }

    struct Breach {
        address operator;
        uint256 amount;
        bytes32 evidence;
        uint64 deadline;
        uint32 votes;
        bool executed;
    }

    IERC20 public immutable stakeToken;
    uint256 public immutable minStake;
    uint64 public immutable votingPeriod;
    address public slashRecipient;
    uint32 public threshold;
    uint32 public voterCount;
    uint256 public totalUnits;
    uint256 public breachCount;

    mapping(address operator => Member) private _members;
    address[] private _operators;
    mapping(address voter => bool) public isVoter;
    mapping(uint256 breachId => Breach) private _breaches;
    mapping(uint256 breachId => mapping(address voter => bool)) public hasVoted;

    event MemberJoined(address indexed operator, bytes32 indexed peerId, uint128 units, uint256 stake);
    event MemberLeft(address indexed operator, uint256 stakeReturned);
    event UnitsChanged(address indexed operator, uint128 oldUnits, uint128 newUnits);
    event StakeAdded(address indexed operator, uint256 amount, uint256 newStake);
    event VoterAdded(address indexed voter);
    event VoterRemoved(address indexed voter);
    event ThresholdChanged(uint32 oldThreshold, uint32 newThreshold);
    event SlashRecipientChanged(address indexed oldRecipient, address indexed newRecipient);
    event BreachProposed(
        uint256 indexed breachId, address indexed operator, address indexed proposer, uint256 amount, bytes32 evidence
    );
    event Voted(uint256 indexed breachId, address indexed voter, uint32 votes);
    event Slashed(uint256 indexed breachId, address indexed operator, uint256 amount, uint256 remainingStake);
    event BreachClosed(uint256 indexed breachId);

    error ZeroAddress();
    error ZeroUnits();
    error StakeTooLow(uint256 stake, uint256 minStake);
    error AlreadyMember(address operator);
    error NotMember(address operator);
    error OpenBreaches(address operator, uint32 open);
    error AlreadyVoter(address voter);
    error NotVoter(address voter);
    error BadThreshold(uint32 threshold, uint32 voterCount);
    error ZeroAmount();
    error UnknownBreach(uint256 breachId);
    error AlreadyVoted(uint256 breachId, address voter);
    error BreachExecuted(uint256 breachId);
    error VotingClosed(uint256 breachId, uint64 deadline);
    error VotingStillOpen(uint256 breachId, uint64 deadline);

    constructor(IERC20 stakeToken_, uint256 minStake_, uint64 votingPeriod_, address slashRecipient_, address owner_)
        Ownable(owner_)
    {
        if (address(stakeToken_) == address(0) || slashRecipient_ == address(0)) revert ZeroAddress();
        stakeToken = stakeToken_;
        minStake = minStake_;
        votingPeriod = votingPeriod_;
        slashRecipient = slashRecipient_;
    }

    // ---- members ----

    /// Joins with `stake` of `stakeToken` (approved beforehand) and `units` GDA units.
    function join(bytes32 peerId, uint128 units, uint256 stake) external {
        if (_members[msg.sender].active) revert AlreadyMember(msg.sender);
        if (units == 0) revert ZeroUnits();
        if (stake < minStake) revert StakeTooLow(stake, minStake);
        _members[msg.sender] = Member({peerId: peerId, units: units, stake: stake, active: true, openBreaches: 0});
        _operators.push(msg.sender);
        totalUnits += units;
        stakeToken.safeTransferFrom(msg.sender, address(this), stake);
        emit MemberJoined(msg.sender, peerId, units, stake);
    }

    function addStake(uint256 amount) external {
        Member storage m = _activeMember(msg.sender);
        if (amount == 0) revert ZeroAmount();
        m.stake += amount;
        stakeToken.safeTransferFrom(msg.sender, address(this), amount);
        emit StakeAdded(msg.sender, amount, m.stake);
    }

    /// Leaves the coalition and takes back what is left of the stake.
    function leaveCoalition() external {
        Member storage m = _activeMember(msg.sender);
        if (m.openBreaches != 0) revert OpenBreaches(msg.sender, m.openBreaches);
        uint256 stake = m.stake;
        totalUnits -= m.units;
        delete _members[msg.sender];
        _removeOperator(msg.sender);
        if (stake != 0) stakeToken.safeTransfer(msg.sender, stake);
        emit MemberLeft(msg.sender, stake);
    }

    /// The pool admin re-weighs an operator's share of the stream.
    function setUnits(address operator, uint128 units) external onlyOwner {
        Member storage m = _activeMember(operator);
        if (units == 0) revert ZeroUnits();
        emit UnitsChanged(operator, m.units, units);
        totalUnits = totalUnits - m.units + units;
        m.units = units;
    }

    function memberOf(address operator) external view returns (Member memory) {
        return _members[operator];
    }

    function operators() external view returns (address[] memory) {
        return _operators;
    }

    // ---- voters ----

    function addVoter(address voter) external onlyOwner {
        if (voter == address(0)) revert ZeroAddress();
        if (isVoter[voter]) revert AlreadyVoter(voter);
        isVoter[voter] = true;
        voterCount += 1;
        emit VoterAdded(voter);
    }

    function removeVoter(address voter) external onlyOwner {
        if (!isVoter[voter]) revert NotVoter(voter);
        if (threshold > voterCount - 1) revert BadThreshold(threshold, voterCount - 1);
        isVoter[voter] = false;
        voterCount -= 1;
        emit VoterRemoved(voter);
    }

    /// k of the n registered voters must agree; 1 <= k <= n.
    function setThreshold(uint32 k) external onlyOwner {
        if (k == 0 || k > voterCount) revert BadThreshold(k, voterCount);
        emit ThresholdChanged(threshold, k);
        threshold = k;
    }

    function setSlashRecipient(address recipient) external onlyOwner {
        if (recipient == address(0)) revert ZeroAddress();
        emit SlashRecipientChanged(slashRecipient, recipient);
        slashRecipient = recipient;
    }

    // ---- breaches ----

    /// A voter opens a breach subject against `operator` and casts the first vote on it.
    function proposeBreach(address operator, uint256 amount, bytes32 evidence) external returns (uint256 breachId) {
        if (!isVoter[msg.sender]) revert NotVoter(msg.sender);
        if (threshold == 0) revert BadThreshold(threshold, voterCount);
        Member storage m = _activeMember(operator);
        if (amount == 0) revert ZeroAmount();
        breachId = ++breachCount;
        _breaches[breachId] = Breach({
            operator: operator,
            amount: amount,
            evidence: evidence,
            deadline: uint64(block.timestamp) + votingPeriod,
            votes: 0,
            executed: false
        });
        m.openBreaches += 1;
        emit BreachProposed(breachId, operator, msg.sender, amount, evidence);
        _vote(breachId);
    }

    function vote(uint256 breachId) external {
        if (!isVoter[msg.sender]) revert NotVoter(msg.sender);
        _vote(breachId);
    }

    /// After the deadline, anyone may close a breach that did not reach the threshold, which frees the
    /// operator to leave again.
    function closeExpired(uint256 breachId) external {
        Breach storage b = _breaches[breachId];
        if (b.operator == address(0)) revert UnknownBreach(breachId);
        if (b.executed) revert BreachExecuted(breachId);
        if (block.timestamp <= b.deadline) revert VotingStillOpen(breachId, b.deadline);
        b.executed = true;
        _members[b.operator].openBreaches -= 1;
        emit BreachClosed(breachId);
    }

    function breachOf(uint256 breachId) external view returns (Breach memory) {
        return _breaches[breachId];
    }

    function _vote(uint256 breachId) private {
        Breach storage b = _breaches[breachId];
        if (b.operator == address(0)) revert UnknownBreach(breachId);
        if (b.executed) revert BreachExecuted(breachId);
        if (block.timestamp > b.deadline) revert VotingClosed(breachId, b.deadline);
        if (hasVoted[breachId][msg.sender]) revert AlreadyVoted(breachId, msg.sender);
        hasVoted[breachId][msg.sender] = true;
        b.votes += 1;
        emit Voted(breachId, msg.sender, b.votes);
        if (b.votes >= threshold) _slash(breachId, b);
    }

    function _slash(uint256 breachId, Breach storage b) private {
        b.executed = true;
        Member storage m = _members[b.operator];
        m.openBreaches -= 1;
        // A member may have fewer tokens at stake than the breach asks for: take what is there.
        uint256 amount = b.amount < m.stake ? b.amount : m.stake;
        m.stake -= amount;
        if (amount != 0) stakeToken.safeTransfer(slashRecipient, amount);
        emit Slashed(breachId, b.operator, amount, m.stake);
        emit BreachClosed(breachId);
    }

    function _activeMember(address operator) private view returns (Member storage m) {
        m = _members[operator];
        if (!m.active) revert NotMember(operator);
    }

    function _removeOperator(address operator) private {
        for (uint256 i = 0; i < _operators.length; i++) {
            if (_operators[i] == operator) {
                _operators[i] = _operators[_operators.length - 1];
                _operators.pop();
                return;
            }
        }
    }
}
