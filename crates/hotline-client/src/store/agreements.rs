//! Agreed texts on a device: propose, sign, reject, and where each stands
//! ([`hotline_core::agreement`]). A proposal is signed by its proposer's device at once;
//! it is accepted when a device of every party in the channel has signed its exact
//! bytes, rejected when a party rejected it, expired when its deadline passed first.

use hotline_core::agreement::{self, Agreement, MAX_REASON_LEN, MAX_VERSIONS, Proposal};

use super::*;

/// Where an agreed text stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgreementState {
    Open,
    Accepted,
    Rejected,
    Expired,
}

impl AgreementState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgreementState::Open => "open",
            AgreementState::Accepted => "accepted",
            AgreementState::Rejected => "rejected",
            AgreementState::Expired => "expired",
        }
    }
}

/// One party's signature of an agreed text, checked.
#[derive(Debug, Clone)]
pub struct Signed {
    pub party: String,
    pub device: String,
    pub time_ms: u64,
    pub signature: [u8; 64],
}

/// An agreed text and who signed or rejected it.
#[derive(Debug, Clone)]
pub struct AgreementStatus {
    pub id: EnvelopeId,
    pub proposer: String,
    pub time_ms: u64,
    pub versions: Vec<(String, String)>,
    pub deadline_ms: Option<u64>,
    /// What every party signs (see [`agreement::digest`]).
    pub digest: [u8; 32],
    pub state: AgreementState,
    /// Valid signatures, the first per party.
    pub signed: Vec<Signed>,
    /// (party, reason).
    pub rejected: Vec<(String, String)>,
    /// Parties in the channel that have not signed.
    pub waiting_for: Vec<String>,
}

impl Store {
    /// Proposes a text (its language versions, equally authentic) for every party's
    /// signature, and signs it for this device's party. Returns the proposal's id.
    pub fn propose_agreement(
        &mut self,
        channel: &str,
        versions: Vec<(String, String)>,
        deadline_ms: Option<u64>,
    ) -> Result<EnvelopeId, StoreError> {
        check_versions(&versions)?;
        self.transact(|connection, identity, cache| {
            let provider = Provider::new(connection);
            let channel_id = channel_id_by_name(connection, channel)?;
            let mut loaded = checkout(cache, connection, &provider, &channel_id)?;
            let proposal = Body::Agreement(Agreement::Propose(Proposal {
                versions: versions.clone(),
                deadline_ms,
            }));
            let id = seal(connection, &provider, identity, &mut loaded, proposal, None)?;
            let digest = agreement::digest(&channel_id, &id, &versions);
            let signature = agreement::sign(identity, &digest);
            let sign = Body::Agreement(Agreement::Sign {
                proposal: id,
                digest,
                signature,
            });
            seal(connection, &provider, identity, &mut loaded, sign, None)?;
            save_channel(connection, &mut loaded, false)?;
            cache.channels.insert(channel_id, loaded);
            Ok(id)
        })
    }

    /// Signs an open agreed text (id or unique prefix of 8+ hex digits) for this
    /// device's party; returns the signature's envelope id.
    pub fn sign_agreement(
        &mut self,
        channel: &str,
        proposal: &str,
    ) -> Result<EnvelopeId, StoreError> {
        let status = self.agreement(channel, proposal)?;
        let party = self.identity.info().party.clone();
        refuse_unless_open(&status, &party)?;
        self.transact(|connection, identity, cache| {
            let provider = Provider::new(connection);
            let channel_id = channel_id_by_name(connection, channel)?;
            let mut loaded = checkout(cache, connection, &provider, &channel_id)?;
            let sign = Body::Agreement(Agreement::Sign {
                proposal: status.id,
                digest: status.digest,
                signature: agreement::sign(identity, &status.digest),
            });
            let id = seal(connection, &provider, identity, &mut loaded, sign, None)?;
            save_channel(connection, &mut loaded, false)?;
            cache.channels.insert(channel_id, loaded);
            Ok(id)
        })
    }

    /// Rejects an open agreed text for this device's party, with a reason.
    pub fn reject_agreement(
        &mut self,
        channel: &str,
        proposal: &str,
        reason: &str,
    ) -> Result<EnvelopeId, StoreError> {
        if reason.len() > MAX_REASON_LEN {
            return Err(StoreError::Agreement(format!(
                "a reason holds at most {MAX_REASON_LEN} bytes"
            )));
        }
        let status = self.agreement(channel, proposal)?;
        let party = self.identity.info().party.clone();
        refuse_unless_open(&status, &party)?;
        let reject = Body::Agreement(Agreement::Reject {
            proposal: status.id,
            reason: reason.to_owned(),
        });
        self.send(channel, reject, None)
    }

    /// One agreed text by id or unique prefix.
    pub fn agreement(
        &mut self,
        channel: &str,
        proposal: &str,
    ) -> Result<AgreementStatus, StoreError> {
        let prefix = proposal.trim().to_ascii_lowercase();
        let unknown = || StoreError::UnknownAgreement(proposal.to_owned());
        if prefix.len() < 8 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unknown());
        }
        let mut found: Vec<AgreementStatus> = self
            .agreements(channel)?
            .into_iter()
            .filter(|status| status.id.to_hex().starts_with(&prefix))
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            _ => Err(unknown()),
        }
    }

    /// Every agreed text of a channel, oldest first, with its state now.
    pub fn agreements(&mut self, channel: &str) -> Result<Vec<AgreementStatus>, StoreError> {
        let now = self.now();
        let provider = Provider::new(&self.connection);
        let loaded = load_channel(&self.connection, &provider, channel)?;
        let channel_id = loaded.id();
        let proposals: Vec<(Vec<u8>, Option<String>)> = self
            .connection
            .prepare_cached("SELECT proposal, final FROM agreements WHERE channel = ?1")?
            .query_map([&channel_id.0[..]], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(proposals.len());
        for (proposal, last) in proposals {
            let Ok(id) = <[u8; 32]>::try_from(proposal.as_slice()).map(EnvelopeId) else {
                continue;
            };
            let steps: Vec<Vec<u8>> = self
                .connection
                .prepare_cached(
                    "SELECT step FROM agreement_steps WHERE channel = ?1 AND proposal = ?2",
                )?
                .query_map(params![&channel_id.0[..], &id.0[..]], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            let steps: Vec<EnvelopeId> = steps
                .into_iter()
                .filter_map(|step| <[u8; 32]>::try_from(step.as_slice()).ok().map(EnvelopeId))
                .collect();
            let Some(mut status) = status_of(&loaded, channel_id, id, &steps, now)? else {
                continue;
            };
            match last.as_deref() {
                Some("accepted") => {
                    status.state = AgreementState::Accepted;
                    status.waiting_for.clear();
                }
                Some("rejected") => status.state = AgreementState::Rejected,
                _ if matches!(
                    status.state,
                    AgreementState::Accepted | AgreementState::Rejected
                ) =>
                {
                    self.connection
                        .prepare_cached(
                            "UPDATE agreements SET final = ?3 WHERE channel = ?1 AND proposal = ?2",
                        )?
                        .execute(params![&channel_id.0[..], &id.0[..], status.state.as_str()])?;
                }
                _ => {}
            }
            out.push(status);
        }
        out.sort_by_key(|status| (status.time_ms, status.id));
        Ok(out)
    }
}

fn check_versions(versions: &[(String, String)]) -> Result<(), StoreError> {
    let refuse = |why: String| Err(StoreError::Agreement(why));
    if versions.is_empty() || versions.len() > MAX_VERSIONS {
        return refuse(format!(
            "an agreed text has 1 to {MAX_VERSIONS} language versions"
        ));
    }
    for (index, (language, text)) in versions.iter().enumerate() {
        if !agreement::language_ok(language) {
            return refuse(format!(
                "{language:?} is not a language code: 1 to 16 letters, digits or '-', as in en or zh-Hant"
            ));
        }
        if versions[..index].iter().any(|(l, _)| l == language) {
            return refuse(format!("language {language} is given twice"));
        }
        if text.trim().is_empty() {
            return refuse(format!("the {language} version is empty"));
        }
    }
    Ok(())
}

fn refuse_unless_open(status: &AgreementStatus, party: &str) -> Result<(), StoreError> {
    if status.state != AgreementState::Open {
        return Err(StoreError::Agreement(format!(
            "agreed text {} is {} already",
            &status.id.to_hex()[..12],
            status.state.as_str()
        )));
    }
    if status.signed.iter().any(|signed| signed.party == party) {
        return Err(StoreError::Agreement(format!(
            "{party} signed agreed text {} already",
            &status.id.to_hex()[..12]
        )));
    }
    Ok(())
}

/// Where proposal `id` stands, from its steps; `None` if the proposal is not in the
/// transcript (yet).
fn status_of(
    channel: &Channel,
    channel_id: ChannelId,
    id: EnvelopeId,
    steps: &[EnvelopeId],
    now_ms: u64,
) -> Result<Option<AgreementStatus>, StoreError> {
    let transcript = channel.transcript();
    let Some(envelope) = transcript.get(&id)? else {
        return Ok(None);
    };
    let Body::Agreement(Agreement::Propose(proposal)) = envelope.body else {
        return Ok(None);
    };
    let digest = agreement::digest(&channel_id, &id, &proposal.versions);
    let party_of =
        |key: &DeviceKey| -> String { transcript.party_of(key).unwrap_or("?").to_owned() };
    let mut signed: BTreeMap<String, Signed> = BTreeMap::new();
    let mut rejected = Vec::new();
    let mut steps: Vec<(u64, hotline_core::Envelope)> = steps
        .iter()
        .filter_map(|step| transcript.get(step).ok().flatten())
        .map(|envelope| (envelope.lamport, envelope))
        .collect();
    steps.sort_by_key(|(lamport, _)| *lamport);
    let mut parties: Vec<String> = channel.members().into_iter().map(|m| m.party).collect();
    parties.sort();
    parties.dedup();
    for (_, step) in steps {
        let party = party_of(&step.sender);
        match step.body {
            Body::Agreement(Agreement::Sign {
                digest: signed_digest,
                signature,
                ..
            }) if signed_digest == digest
                && proposal
                    .deadline_ms
                    .is_none_or(|deadline| step.claimed_time_ms <= deadline)
                && agreement::check(&step.sender, &digest, &signature) =>
            {
                let device = transcript
                    .roster()
                    .get(&step.sender)
                    .map_or_else(String::new, |info| info.device.clone());
                signed.entry(party.clone()).or_insert(Signed {
                    party,
                    device,
                    time_ms: step.claimed_time_ms,
                    signature,
                });
            }
            // A rejection counts from a party that has not signed, before the deadline
            // and before the text was accepted: a signature binds, and a final state
            // stays final.
            Body::Agreement(Agreement::Reject { reason, .. })
                if !signed.contains_key(&party)
                    && proposal
                        .deadline_ms
                        .is_none_or(|deadline| step.claimed_time_ms <= deadline)
                    && !parties.iter().all(|p| signed.contains_key(p)) =>
            {
                rejected.push((party, reason))
            }
            _ => {}
        }
    }
    let waiting_for: Vec<String> = parties
        .into_iter()
        .filter(|party| !signed.contains_key(party))
        .collect();
    let state = if !rejected.is_empty() {
        AgreementState::Rejected
    } else if waiting_for.is_empty() {
        AgreementState::Accepted
    } else if proposal
        .deadline_ms
        .is_some_and(|deadline| now_ms >= deadline)
    {
        AgreementState::Expired
    } else {
        AgreementState::Open
    };
    Ok(Some(AgreementStatus {
        id,
        proposer: party_of(&envelope.sender),
        time_ms: envelope.claimed_time_ms,
        versions: proposal.versions,
        deadline_ms: proposal.deadline_ms,
        digest,
        state,
        signed: signed.into_values().collect(),
        rejected,
        waiting_for,
    }))
}
