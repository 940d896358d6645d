//! This device's card and its verified contacts.

use hotline_proto::capability::Capability;

use super::*;

/// A contact's inbox relays, and the capability to post there (`None` on a card made
/// before capabilities).
pub type ContactInbox = (Vec<String>, Option<Capability>);

impl Store {
    /// This device's contact card.
    pub fn card(&self) -> Result<Vec<u8>, StoreError> {
        Ok(self
            .connection
            .query_row("SELECT card FROM device WHERE id = 1", [], |row| row.get(0))?)
    }

    /// Imports a card after checking it against the fingerprint read out of band.
    pub fn import_card(
        &mut self,
        card: &[u8],
        fingerprint: &Fingerprint,
    ) -> Result<DeviceInfo, StoreError> {
        let contact =
            CardIn::decode(card)?.verify(fingerprint, Provider::new(&self.connection).crypto())?;
        let info = contact.info.clone();
        self.transact(|connection, _, _| {
            crate::store::cached::execute(connection,
                "INSERT INTO contacts (key, party, device, card, imported_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (key) DO UPDATE SET party = ?2, device = ?3, card = ?4, imported_ms = ?5,
                   key_packages_used = CASE WHEN card = ?4 THEN key_packages_used ELSE 0 END",
                params![&info.key.0[..], info.party, info.device, card, now_ms() as i64],
            )?;
            Ok(())
        })?;
        Ok(info)
    }

    /// Verified contacts.
    pub fn contacts(&self) -> Result<Vec<DeviceInfo>, StoreError> {
        let mut statement = self
            .connection
            .prepare_cached("SELECT key, party, device FROM contacts ORDER BY party, device")?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get(1)?, row.get(2)?))
        })?;
        rows.map(|row| {
            let (key, party, device) = row?;
            let key: [u8; 32] = key.try_into().map_err(|_| corrupt("contact key"))?;
            Ok(DeviceInfo {
                party,
                device,
                key: DeviceKey(key),
            })
        })
        .collect()
    }

    /// Relays named on a contact's card (where it receives invitations).
    pub fn contact_relays(&self, device: &DeviceKey) -> Result<Vec<String>, StoreError> {
        Ok(self
            .contact_inbox(device)?
            .map(|(relays, _)| relays)
            .unwrap_or_default())
    }

    /// A contact's inbox relays and the capability to post there (from its card;
    /// `None` on a card made before capabilities), or `None` for a device whose card
    /// this device does not hold.
    pub fn contact_inbox(&self, device: &DeviceKey) -> Result<Option<ContactInbox>, StoreError> {
        let card: Option<Vec<u8>> = self
            .connection
            .query_row(
                "SELECT card FROM contacts WHERE key = ?1",
                [&device.0[..]],
                |row| row.get(0),
            )
            .optional()?;
        let Some(card) = card else {
            return Ok(None);
        };
        let card = CardIn::decode(&card)?;
        Ok(Some((
            card.relays().to_vec(),
            card.inbox_capability().map(|c| Capability::new(*c)),
        )))
    }

    /// Relays on this device's own card.
    pub fn own_relays(&self) -> Result<Vec<String>, StoreError> {
        Ok(CardIn::decode(&self.card()?)?.relays().to_vec())
    }
}
