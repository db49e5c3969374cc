"""A Python client generated from proto/ with grpcio-tools: register, log in, read users/me.

Usage: identity_client.py <generated code dir> <host:port>
"""

import sys
import uuid

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from keel.identity.v1 import identity_pb2, identity_pb2_grpc  # noqa: E402

channel = grpc.insecure_channel(sys.argv[2])
identity = identity_pb2_grpc.IdentityServiceStub(channel)
email = f"py-{uuid.uuid4().hex[:8]}@example.com"
password = "correct horse battery"

registered = identity.Register(
    identity_pb2.RegisterRequest(email=email, password=password, display_name="Py Client")
)
assert registered.user.email == email, registered
assert registered.token_type == "Bearer", registered

login = identity.Login(identity_pb2.LoginRequest(email=email, password=password))
me = identity.GetUser(
    identity_pb2.GetUserRequest(name="users/me"),
    metadata=[("authorization", f"Bearer {login.access_token}")],
)
assert me.email == email, me
assert me.display_name == "Py Client", me
assert me.name == registered.user.name, me

try:
    identity.Login(identity_pb2.LoginRequest(email=email, password="wrong password"))
    raise AssertionError("a wrong password was accepted")
except grpc.RpcError as error:
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error

try:
    identity.Register(identity_pb2.RegisterRequest(email="not an email", password=password))
    raise AssertionError("a malformed e-mail was accepted")
except grpc.RpcError as error:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error

print("python client: ok")
