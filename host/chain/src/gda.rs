//! Superfluid's General Distribution Agreement (GDA) as pure integer functions, and a model that predicts
//! every account's SuperToken balance to the wei.
//!
//! The rules, as `GeneralDistributionAgreementV1` and `solidity-semantic-money` 1.15.2 implement them:
//! - A pool's flow is shared per unit: per-unit rate = floor(distribution rate / total units), where the
//!   total counts connected and disconnected members alike. The distributor pays per-unit × total units.
//! - Distributing: the new distribution rate is floor((current distribution rate + requested − previous
//!   request + adjustment) / total) × total; the distributor's actual rate is what the members get, and
//!   what a requested rate loses to the floor is simply not paid.
//! - Changing units under a running flow keeps the pool's total outflow: the per-unit rate becomes
//!   floor(old total flow / new total units) and the remainder flows to the pool admin as the
//!   "adjustment flow", until the next `distributeFlow` folds it back in.
//! - Buffer (deposit) of a distribution flow = max(rate × liquidation period, minimum deposit) while the
//!   rate is positive, 0 once it is stopped; it is taken from the distributor's available balance at once
//!   and returned when the flow stops.
//! - A connected member's balance rises at per-unit × its units each second; a disconnected member's
//!   share waits in the pool until claimed (the model keeps it on the pool).
//!
//! Flow rates are wei per second (`int96` on chain, `i128` here); balances are `i128` (±1.7e38 wei).

use std::collections::BTreeMap;

use alloy::primitives::Address;

/// floor(requested / total units): what one unit receives per second (0 for an empty pool).
pub fn per_unit_rate(requested: i128, total_units: u128) -> i128 {
    if total_units == 0 {
        return 0;
    }
    requested.div_euclid(total_units as i128)
}

/// What a distributor actually pays to a fresh pool for a requested rate: per-unit × total units.
pub fn actual_flow_rate(requested: i128, total_units: u128) -> i128 {
    per_unit_rate(requested, total_units) * total_units as i128
}

/// The deposit a distribution flow locks: max(rate × liquidation period, minimum deposit), or nothing for a
/// stopped flow.
pub fn buffer(flow_rate: i128, liquidation_period: u64, minimum_deposit: u128) -> u128 {
    if flow_rate <= 0 {
        return 0;
    }
    let by_rate = flow_rate as u128 * liquidation_period as u128;
    by_rate.max(minimum_deposit)
}

/// A pool's flow state: what `distributeFlow` and `updateMemberUnits` read and write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolFlow {
    pub total_units: u128,
    pub per_unit_rate: i128,
    /// Flowing from the pool to its admin (the remainder of a per-unit rounding after a units change).
    pub adjustment_rate: i128,
}

impl PoolFlow {
    /// The flow to all members together.
    pub fn distribution_rate(&self) -> i128 {
        self.per_unit_rate * self.total_units as i128
    }

    /// `distributeFlow` from a distributor whose current flow into this pool is `old_rate`: returns the new
    /// state and the distributor's new actual rate (`TokenMonad._doDistributeFlowViaPool`).
    pub fn distribute(&self, old_rate: i128, requested: i128) -> (PoolFlow, i128) {
        let old_distribution = self.distribution_rate();
        let shift = requested - old_rate + self.adjustment_rate;
        let new_per_unit = per_unit_rate(old_distribution + shift, self.total_units);
        let new_distribution = new_per_unit * self.total_units as i128;
        let mut actual = old_rate + (new_distribution - old_distribution) - self.adjustment_rate;
        let adjustment = if actual >= 0 {
            0
        } else {
            let a = -actual;
            actual = 0;
            a
        };
        let next = PoolFlow {
            total_units: self.total_units,
            per_unit_rate: if self.total_units == 0 { self.per_unit_rate } else { new_per_unit },
            adjustment_rate: adjustment,
        };
        (next, actual)
    }

    /// A member's units go from `old_units` to `new_units` (`SemanticMoney.pool_member_update`): the total
    /// outflow is kept, the per-unit rate re-floored, the remainder added to the adjustment flow.
    pub fn set_member_units(&self, old_units: u128, new_units: u128) -> PoolFlow {
        let new_total = self.total_units - old_units + new_units;
        let flow = self.distribution_rate();
        let (per_unit, remainder) = if new_total == 0 {
            (0, flow)
        } else {
            let q = flow.div_euclid(new_total as i128);
            (q, flow - q * new_total as i128)
        };
        PoolFlow { total_units: new_total, per_unit_rate: per_unit, adjustment_rate: self.adjustment_rate + remainder }
    }
}

/// The chain's rules for one token, read from its governance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SolvencyRules {
    pub liquidation_period: u64,
    pub minimum_deposit: u128,
}

#[derive(Clone, Debug, Default)]
struct Account {
    /// Balance at `since`, not counting deposits.
    settled: i128,
    rate: i128,
    since: u64,
    deposit: u128,
}

impl Account {
    fn settle(&mut self, t: u64) {
        assert!(t >= self.since, "the model's clock must not run backwards ({t} < {})", self.since);
        self.settled += self.rate * (t - self.since) as i128;
        self.since = t;
    }
}

#[derive(Clone, Debug)]
struct Member {
    units: u128,
    connected: bool,
}

/// One GDA pool with one distributor, and every balance it moves: the distributor, the admin (adjustment
/// flow), connected members, and the pool itself (disconnected members' shares). Feed it the chain's
/// operations with the timestamps of the blocks they were mined in; `available_balance` then predicts each
/// account's `SuperToken.balanceOf` at any later time.
#[derive(Clone, Debug)]
pub struct GdaModel {
    pool: Address,
    admin: Address,
    rules: SolvencyRules,
    flow: PoolFlow,
    members: BTreeMap<Address, Member>,
    distributor: Option<(Address, i128)>,
    accounts: BTreeMap<Address, Account>,
}

impl GdaModel {
    pub fn new(pool: Address, admin: Address, rules: SolvencyRules) -> Self {
        Self {
            pool,
            admin,
            rules,
            flow: PoolFlow::default(),
            members: BTreeMap::new(),
            distributor: None,
            accounts: BTreeMap::new(),
        }
    }

    /// Starts following `account` with `balance` at time `t` (before any flow touches it).
    pub fn track(&mut self, account: Address, balance: i128, t: u64) {
        self.accounts.insert(account, Account { settled: balance, rate: 0, since: t, deposit: 0 });
    }

    pub fn flow(&self) -> PoolFlow {
        self.flow
    }

    /// The distributor's actual flow rate into the pool.
    pub fn distributor_rate(&self) -> i128 {
        self.distributor.map(|(_, r)| r).unwrap_or(0)
    }

    pub fn deposit_of(&self, account: Address) -> u128 {
        self.accounts.get(&account).map(|a| a.deposit).unwrap_or(0)
    }

    pub fn member_rate(&self, member: Address) -> i128 {
        self.members.get(&member).map(|m| self.flow.per_unit_rate * m.units as i128).unwrap_or(0)
    }

    /// `SuperToken.balanceOf(account)` at time `t`: settled value plus flows since, less its deposit.
    pub fn available_balance(&self, account: Address, t: u64) -> i128 {
        let Some(a) = self.accounts.get(&account) else { return 0 };
        a.settled + a.rate * (t - a.since) as i128 - a.deposit as i128
    }

    pub fn set_units(&mut self, member: Address, units: u128, t: u64) {
        self.settle_all(t);
        let old = self.members.get(&member).map(|m| m.units).unwrap_or(0);
        self.flow = self.flow.set_member_units(old, units);
        self.members.entry(member).or_insert(Member { units: 0, connected: false }).units = units;
        self.apply_rates();
    }

    pub fn connect(&mut self, member: Address, t: u64) {
        self.settle_all(t);
        self.members.entry(member).or_insert(Member { units: 0, connected: false }).connected = true;
        self.apply_rates();
    }

    /// `distributeFlow(token, distributor, pool, requested)` mined at `t`; returns the actual rate.
    pub fn distribute_flow(&mut self, distributor: Address, requested: i128, t: u64) -> i128 {
        self.settle_all(t);
        let old = match self.distributor {
            Some((d, r)) => {
                assert_eq!(d, distributor, "the model follows one distributor per pool");
                r
            }
            None => 0,
        };
        let (flow, actual) = self.flow.distribute(old, requested);
        self.flow = flow;
        self.distributor = Some((distributor, actual));
        let deposit = buffer(actual, self.rules.liquidation_period, self.rules.minimum_deposit);
        self.accounts.entry(distributor).or_insert_with(|| Account { since: t, ..Default::default() }).deposit = deposit;
        self.apply_rates();
        actual
    }

    fn settle_all(&mut self, t: u64) {
        for account in [self.pool, self.admin].into_iter().chain(self.members.keys().copied()) {
            self.accounts.entry(account).or_insert_with(|| Account { since: t, ..Default::default() });
        }
        for a in self.accounts.values_mut() {
            a.settle(t);
        }
    }

    /// Recomputes every tracked account's net rate from the pool's state.
    fn apply_rates(&mut self) {
        let mut rates: BTreeMap<Address, i128> = BTreeMap::new();
        if let Some((d, r)) = self.distributor {
            *rates.entry(d).or_default() -= r;
        }
        *rates.entry(self.admin).or_default() += self.flow.adjustment_rate;
        let mut to_members = 0;
        for (addr, m) in &self.members {
            let r = self.flow.per_unit_rate * m.units as i128;
            if m.connected {
                *rates.entry(*addr).or_default() += r;
                to_members += r;
            }
        }
        // The pool keeps what it receives less what it passes on: the disconnected members' shares.
        *rates.entry(self.pool).or_default() +=
            self.distributor_rate() - self.flow.adjustment_rate - to_members;
        for (addr, a) in self.accounts.iter_mut() {
            a.rate = rates.get(addr).copied().unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RULES: SolvencyRules = SolvencyRules { liquidation_period: 4 * 3600, minimum_deposit: 0 };

    fn addr(n: u8) -> Address {
        Address::with_last_byte(n)
    }

    #[test]
    fn per_unit_floors() {
        assert_eq!(per_unit_rate(1_000_000_000_007, 6), 166_666_666_667);
        assert_eq!(actual_flow_rate(1_000_000_000_007, 6), 1_000_000_000_002);
        assert_eq!(per_unit_rate(5, 6), 0);
        assert_eq!(per_unit_rate(5, 0), 0);
        // The note's observation: 1e15 wei/s over 10 units (1:2:3 connected + 4 not).
        assert_eq!(per_unit_rate(1_000_000_000_000_000, 10), 100_000_000_000_000);
    }

    #[test]
    fn buffer_rules() {
        assert_eq!(buffer(1_000_000_000_000_000, 14_400, 0), 14_400_000_000_000_000_000);
        assert_eq!(buffer(1, 14_400, 1_000_000), 1_000_000);
        assert_eq!(buffer(0, 14_400, 1_000_000), 0);
        assert_eq!(buffer(-5, 14_400, 1_000_000), 0);
    }

    #[test]
    fn units_change_sends_the_remainder_to_the_admin() {
        let (flow, actual) = PoolFlow { total_units: 6, ..Default::default() }.distribute(0, 600);
        assert_eq!((flow.per_unit_rate, actual, flow.adjustment_rate), (100, 600, 0));
        // A seventh unit: 600 / 7 = 85 per unit (595), 5 wei/s to the admin; the distributor still pays 600.
        let flow = flow.set_member_units(0, 1);
        assert_eq!((flow.total_units, flow.per_unit_rate, flow.adjustment_rate), (7, 85, 5));
        // Re-requesting the same rate folds the adjustment back in.
        let (flow, actual) = flow.distribute(600, 600);
        assert_eq!((flow.per_unit_rate, flow.adjustment_rate, actual), (85, 0, 595));
        // Stopping.
        let (flow, actual) = flow.distribute(595, 0);
        assert_eq!((flow.per_unit_rate, actual, flow.adjustment_rate), (0, 0, 0));
    }

    #[test]
    fn model_balances_for_one_two_three() {
        let (pool, admin, d) = (addr(100), addr(101), addr(102));
        let mut m = GdaModel::new(pool, admin, RULES);
        m.track(d, 1_000_000_000_000_000_000_000, 10);
        for (i, u) in [1u128, 2, 3].into_iter().enumerate() {
            m.set_units(addr(i as u8 + 1), u, 10);
        }
        for i in 1..=3 {
            m.connect(addr(i), 11);
        }
        let actual = m.distribute_flow(d, 1_000_000_000_007, 12);
        assert_eq!(actual, 1_000_000_000_002);
        assert_eq!(m.available_balance(addr(3), 12 + 3600), 3 * 166_666_666_667 * 3600);
        assert_eq!(
            m.available_balance(d, 12 + 3600),
            1_000_000_000_000_000_000_000 - actual * 3600 - (actual * 14_400)
        );
        m.distribute_flow(d, 0, 12 + 3600);
        assert_eq!(m.available_balance(addr(3), 12 + 7200), 3 * 166_666_666_667 * 3600, "stopped");
        assert_eq!(m.available_balance(d, 12 + 7200), 1_000_000_000_000_000_000_000 - actual * 3600, "deposit back");
    }

    #[derive(Clone, Debug)]
    enum Op {
        Units(u8, u16),
        Connect(u8),
        Flow(i64),
        Wait(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4, 0u16..50).prop_map(|(m, u)| Op::Units(m, u)),
            (0u8..4).prop_map(Op::Connect),
            (0i64..1_000_000_000_000).prop_map(Op::Flow),
            (0u32..100_000).prop_map(Op::Wait),
        ]
    }

    proptest! {
        /// Money is neither made nor lost: the distributor's outflow equals members' + admin's + pool's
        /// inflow, and deposits come back whole once the flow stops.
        #[test]
        fn model_conserves_money(ops in proptest::collection::vec(op(), 1..40)) {
            let (pool, admin, d) = (addr(100), addr(101), addr(102));
            let start = 1_000_000_000_000_000_000_000i128;
            let mut m = GdaModel::new(pool, admin, SolvencyRules { liquidation_period: 14_400, minimum_deposit: 7 });
            m.track(d, start, 0);
            let mut t = 0u64;
            for op in ops {
                match op {
                    Op::Units(i, u) => m.set_units(addr(i + 1), u as u128, t),
                    Op::Connect(i) => m.connect(addr(i + 1), t),
                    Op::Flow(r) => { m.distribute_flow(d, r as i128, t); }
                    Op::Wait(s) => t += s as u64,
                }
                let f = m.flow();
                // What the distributor pays is exactly what members and admin get.
                prop_assert_eq!(m.distributor_rate(), f.distribution_rate() + f.adjustment_rate);
                prop_assert!(f.adjustment_rate >= 0 && f.per_unit_rate >= 0);
                let everyone: i128 = [d, admin, pool, addr(1), addr(2), addr(3), addr(4)]
                    .iter()
                    .map(|a| m.available_balance(*a, t) + m.deposit_of(*a) as i128)
                    .sum();
                prop_assert_eq!(everyone, start);
            }
            m.distribute_flow(d, 0, t);
            prop_assert_eq!(m.deposit_of(d), 0);
        }

        /// The pure per-unit rule: actual ≤ requested, and the loss is less than one wei/s per unit.
        #[test]
        fn floor_loses_less_than_one_per_unit(requested in 0i128..(1i128 << 95), units in 1u128..1_000_000) {
            let actual = actual_flow_rate(requested, units);
            prop_assert!(actual <= requested);
            prop_assert!(requested - actual < units as i128);
        }
    }
}
