//! A voter that traps on every vote: the judge must count it as a crashed voter (no ballot) and the
//! host must replace its instance each time.
#![no_std]

use computepool::coalition_voter::types::{Ballot, BreachReport, VoterError};
use exports::computepool::coalition_voter::voter::Guest;

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/coalition-voter/0.1.0"],
    world: "computepool:coalition-voter/coalition-voter@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

struct Trap;
export!(Trap);

impl Guest for Trap {
    fn vote(_report: BreachReport) -> Result<Ballot, VoterError> {
        core::arch::wasm32::unreachable()
    }
}
