//! The dissenting voter of the judge's tests: dismisses every report, whatever it says, so a test can
//! show that one voter voting against the others neither blocks nor forces a quorum.
#![no_std]

use alloc::string::ToString;
use computepool::coalition_voter::types::{Ballot, BreachReport, Decision, VoterError};
use exports::computepool::coalition_voter::voter::Guest;

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/coalition-voter/0.1.0"],
    world: "computepool:coalition-voter/coalition-voter@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

struct Dissent;
export!(Dissent);

impl Guest for Dissent {
    fn vote(_report: BreachReport) -> Result<Ballot, VoterError> {
        Ok(Ballot { decision: Decision::Dismiss, reason: "dissent: this voter dismisses every report".to_string() })
    }
}
