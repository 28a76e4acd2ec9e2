"""node.client.Client's calls about users: add, change, new token, remove, list (admins),
who the node takes the caller for (anyone), and the web UI's sessions (the HTTP face's
sign-in, cluster token only). Tokens are shown only in these answers."""

from __future__ import annotations

import builtins
from typing import Any, cast

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc


class UserCalls:
    """Mixed into Client, which provides _call and _stub."""

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        raise NotImplementedError

    @property
    def _stub(self) -> pb_grpc.SchedulerStub:
        raise NotImplementedError

    def add_user(self, request: pb.AddUserRequest) -> pb.UserTokenResponse:
        return cast(pb.UserTokenResponse, self._call(self._stub.AddUser, request))

    def set_user(self, request: pb.SetUserRequest) -> pb.User:
        return cast(pb.User, self._call(self._stub.SetUser, request))

    def rotate_user_token(self, name: str, expires: float = 0.0) -> pb.UserTokenResponse:
        request = pb.RotateUserTokenRequest(name=name, expires_seconds=expires)
        return cast(pb.UserTokenResponse, self._call(self._stub.RotateUserToken, request))

    def remove_user(self, name: str) -> pb.RemoveUserResponse:
        request = pb.RemoveUserRequest(name=name)
        return cast(pb.RemoveUserResponse, self._call(self._stub.RemoveUser, request))

    def users(self) -> builtins.list[pb.User]:
        return list(self._call(self._stub.ListUsers, pb.ListUsersRequest()).users)

    def whoami(self) -> pb.Identity:
        return cast(pb.Identity, self._call(self._stub.WhoAmI, pb.WhoAmIRequest()))

    # -- web UI sessions (the HTTP face's sign-in) -------------------------------------------

    def create_session(self, identity: str) -> pb.CreateSessionResponse:
        """A new session for identity (the caller proves itself with the token)."""
        response: pb.CreateSessionResponse = self._call(
            self._stub.CreateSession, pb.CreateSessionRequest(identity=identity))
        return response

    def check_session(self, session_id: str) -> pb.Session:
        """The live session; raises NotFound (unknown, revoked, expired) or InvalidRequest."""
        session: pb.Session = self._call(self._stub.CheckSession,
                                         pb.CheckSessionRequest(session_id=session_id))
        return session

    def revoke_session(self, session_id: str) -> bool:
        """End a session on every node; False when there was no such session."""
        response: pb.RevokeSessionResponse = self._call(
            self._stub.RevokeSession, pb.RevokeSessionRequest(session_id=session_id))
        return response.revoked

    # -- cluster settings (`filch cluster`) -------------------------------------------------

    def set_cluster_setting(self, key: str, value: str) -> pb.ClusterSettings:
        """Set a cluster-wide setting ("default" unsets it; admin only)."""
        settings: pb.ClusterSettings = self._call(
            self._stub.SetClusterSetting, pb.SetClusterSettingRequest(key=key, value=value))
        return settings

    def cluster_settings(self) -> pb.ClusterSettings:
        """The cluster-wide settings as stored (an unset field is its default)."""
        settings: pb.ClusterSettings = self._call(self._stub.GetClusterSettings,
                                                  pb.GetClusterSettingsRequest())
        return settings
