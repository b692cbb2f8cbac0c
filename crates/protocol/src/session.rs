//! Checks common to every message of an established session.

use cleanroom_wire::{Message, SessionId};

use crate::ProtocolError;

/// Decodes a frame and checks that it belongs to `session`; an `Abort` for
/// this session becomes [`ProtocolError::PeerAborted`].
pub(crate) fn decode_for(frame: &[u8], session: &SessionId) -> Result<Message, ProtocolError> {
    let msg = Message::decode(frame)?;
    match msg.session() {
        Some(s) if s == session => {}
        Some(_) => return Err(ProtocolError::WrongSession),
        None => {
            return Err(ProtocolError::UnexpectedMessage {
                got: msg.kind(),
                state: "in an established session",
            });
        }
    }
    if let Message::Abort(a) = msg {
        return Err(ProtocolError::PeerAborted { code: a.code });
    }
    Ok(msg)
}
