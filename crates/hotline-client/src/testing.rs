//! Set-ups shared by the tests and benchmarks of this crate (not for applications).

use std::path::Path;

use crate::Store;
use crate::store::StoreError;

/// Two new devices, north and south, that imported each other's cards with the right
/// fingerprints, and a channel "crisis" created by north and joined by south.
pub fn verified_pair(north_home: &Path, south_home: &Path) -> (Store, Store) {
    try_verified_pair(north_home, south_home).unwrap_or_else(|error| {
        // Only tests and benchmarks call this; a failed set-up must stop them loudly.
        #[allow(clippy::panic)]
        {
            panic!("setting up two devices failed: {error}")
        }
    })
}

fn try_verified_pair(north_home: &Path, south_home: &Path) -> Result<(Store, Store), StoreError> {
    let mut north = Store::init(north_home, "north", "desk", &[])?;
    let mut south = Store::init(south_home, "south", "desk", &[])?;
    north.import_card(&south.card()?, &south.identity().fingerprint())?;
    south.import_card(&north.card()?, &north.identity().fingerprint())?;
    north.create_channel("crisis", &["south".into()], &[])?;
    south.import_bundle(north.export_outbox()?)?;
    Ok((north, south))
}
