"""A Python client generated from proto/ with grpcio-tools: register, log in, read users/me,
create a product (admin), top up, place an order and watch it to CONFIRMED; then read the field
violations (google.rpc.BadRequest) of a refused call.

Usage: order_flow.py <generated code dir> <host:port>
"""

import sys
import uuid

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402
from keel.catalog.v1 import catalog_pb2, catalog_pb2_grpc  # noqa: E402
from keel.identity.v1 import identity_pb2, identity_pb2_grpc  # noqa: E402
from keel.orders.v1 import orders_pb2, orders_pb2_grpc  # noqa: E402
from keel.payments.v1 import payments_pb2, payments_pb2_grpc  # noqa: E402
from keel.type.v1 import money_pb2  # noqa: E402

channel = grpc.insecure_channel(sys.argv[2])
identity = identity_pb2_grpc.IdentityServiceStub(channel)
catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
payments = payments_pb2_grpc.PaymentServiceStub(channel)
orders = orders_pb2_grpc.OrderServiceStub(channel)
password = "correct horse battery"


def bearer(token):
    return [("authorization", f"Bearer {token}")]


def eur(cents):
    return money_pb2.Money(currency_code="EUR", units=cents)


# The first user of a fresh keel is its admin.
admin = identity.Register(
    identity_pb2.RegisterRequest(email="admin@example.com", password=password)
)
email = f"py-{uuid.uuid4().hex[:8]}@example.com"
registered = identity.Register(
    identity_pb2.RegisterRequest(email=email, password=password, display_name="Py Client")
)
assert registered.user.email == email, registered
assert registered.token_type == "Bearer", registered

login = identity.Login(identity_pb2.LoginRequest(email=email, password=password))
me = identity.GetUser(
    identity_pb2.GetUserRequest(name="users/me"), metadata=bearer(login.access_token)
)
assert me.display_name == "Py Client", me
assert me.name == registered.user.name, me

lamp = catalog.CreateProduct(
    catalog_pb2.CreateProductRequest(
        product=catalog_pb2.Product(title="Lamp", price=eur(2500), stock=5),
        request_id=str(uuid.uuid4()),
    ),
    metadata=bearer(admin.access_token),
)
payments.TopUpWallet(
    payments_pb2.TopUpWalletRequest(
        name="users/me/wallet", amount=eur(10000), request_id=str(uuid.uuid4())
    ),
    metadata=bearer(login.access_token),
)
placed = orders.PlaceOrder(
    orders_pb2.PlaceOrderRequest(
        parent="users/me",
        order=orders_pb2.Order(line_items=[orders_pb2.LineItem(product=lamp.name, quantity=2)]),
        request_id=str(uuid.uuid4()),
    ),
    metadata=bearer(login.access_token),
)
state = placed.state
for change in orders.WatchOrder(
    orders_pb2.WatchOrderRequest(name=placed.name), metadata=bearer(login.access_token)
):
    state = change.order.state
    if state != orders_pb2.Order.PENDING:
        break
assert state == orders_pb2.Order.CONFIRMED, orders_pb2.Order.State.Name(state)

try:
    identity.Login(identity_pb2.LoginRequest(email=email, password="wrong password"))
    raise AssertionError("a wrong password was accepted")
except grpc.RpcError as error:
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error

# A refused call carries google.rpc.BadRequest: which field, and why.
try:
    catalog.CreateProduct(
        catalog_pb2.CreateProductRequest(
            product=catalog_pb2.Product(title="", price=eur(100))
        ),
        metadata=bearer(admin.access_token),
    )
    raise AssertionError("an empty title was accepted")
except grpc.RpcError as error:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    violations = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations.extend(v.field for v in bad_request.field_violations)
    assert "product.title" in violations, violations

print("python client: ok")
