//! The one place where core errors become etcd's gRPC status codes and messages
//! (etcd's `rpctypes`), so clients react to oxcd exactly as to etcd.

use crate::error::EtcdError;
use tonic::{Code, Status};

impl From<EtcdError> for Status {
    fn from(e: EtcdError) -> Status {
        let (code, msg) = match &e {
            EtcdError::EmptyKey
            | EtcdError::KeyNotFound
            | EtcdError::ValueProvided
            | EtcdError::LeaseProvided
            | EtcdError::TooManyOps
            | EtcdError::DuplicateKey
            | EtcdError::RequestTooLarge => (Code::InvalidArgument, e.to_string()),
            EtcdError::Compacted => (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted".into(),
            ),
            EtcdError::FutureRev => (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision".into(),
            ),
            EtcdError::NoSpace => (
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded".into(),
            ),
            EtcdError::Corrupt => (Code::DataLoss, e.to_string()),
            EtcdError::LeaseNotFound => (
                Code::NotFound,
                "etcdserver: requested lease not found".into(),
            ),
            EtcdError::LeaseExists => (
                Code::FailedPrecondition,
                "etcdserver: lease already exists".into(),
            ),
            EtcdError::LeaseTtlTooLarge => {
                (Code::OutOfRange, "etcdserver: too large lease TTL".into())
            }
            EtcdError::NotLeader
            | EtcdError::BadLeaderTransferee
            | EtcdError::MemberExist
            | EtcdError::PeerUrlExist
            | EtcdError::MemberNotLearner
            | EtcdError::TooManyLearners
            | EtcdError::LearnerNotReady
            // etcd 3.6 (3.4 said Unavailable).
            | EtcdError::NotSupportedForLearner => (Code::FailedPrecondition, e.to_string()),
            EtcdError::MemberBadUrls => (Code::InvalidArgument, e.to_string()),
            EtcdError::MemberNotFound => (Code::NotFound, e.to_string()),
            EtcdError::Unhealthy
            | EtcdError::NoLeader
            | EtcdError::Timeout
            | EtcdError::LeaderTransferTimeout
            | EtcdError::Stopped
            | EtcdError::LeaderChanged => (Code::Unavailable, e.to_string()),
            EtcdError::RootUserNotExist
            | EtcdError::RootRoleNotExist
            | EtcdError::UserAlreadyExist
            | EtcdError::UserNotFound
            | EtcdError::RoleAlreadyExist
            | EtcdError::RoleNotFound
            | EtcdError::RoleNotGranted
            | EtcdError::PermissionNotGranted
            | EtcdError::AuthNotEnabled => (Code::FailedPrecondition, e.to_string()),
            EtcdError::UserEmpty
            | EtcdError::RoleEmpty
            | EtcdError::PermissionNotGiven
            | EtcdError::AuthFailed
            | EtcdError::InvalidAuthMgmt
            | EtcdError::AuthOldRevision => (Code::InvalidArgument, e.to_string()),
            EtcdError::PermissionDenied => (Code::PermissionDenied, e.to_string()),
            EtcdError::WrongDowngradeVersionFormat | EtcdError::InvalidDowngradeTargetVersion => {
                (Code::InvalidArgument, e.to_string())
            }
            EtcdError::DowngradeInProcess => (Code::FailedPrecondition, e.to_string()),
            EtcdError::UnknownMethod => (Code::Unknown, e.to_string()),
            EtcdError::RangeStreamSort | EtcdError::RangeStreamFilter => {
                (Code::Unimplemented, e.to_string())
            }
            EtcdError::InvalidAuthToken => (Code::Unauthenticated, e.to_string()),
            // etcd 3.4 has no gRPC mapping for these: clients see codes.Unknown.
            EtcdError::MemberNotEnoughStarted
            | EtcdError::NoPasswordUser
            | EtcdError::Internal(_) => (Code::Unknown, e.to_string()),
        };
        Status::new(code, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_match_etcd_rpctypes() {
        let s: Status = EtcdError::Compacted.into();
        assert_eq!(s.code(), Code::OutOfRange);
        assert_eq!(
            s.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let s: Status = EtcdError::DuplicateKey.into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "etcdserver: duplicate key given in txn request"
        );
        let s: Status = EtcdError::LeaseNotFound.into();
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "etcdserver: requested lease not found");
    }
}
