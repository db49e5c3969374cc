// A Node client generated from proto/ with buf and @bufbuild/protoc-gen-es, calling keel over
// gRPC with Connect: register, log in, create a product (admin), top up, place an order and
// watch it to CONFIRMED; then read the field violations of a refused call.
//
// Usage: node order_flow.js <host:port>  (compiled by tsc against the generated code)

import { randomUUID } from "node:crypto";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { BadRequestSchema } from "./gen/google/rpc/error_details_pb.js";
import { CatalogService } from "./gen/keel/catalog/v1/catalog_pb.js";
import { IdentityService } from "./gen/keel/identity/v1/identity_pb.js";
import { Order_State, OrderService } from "./gen/keel/orders/v1/orders_pb.js";
import { PaymentService } from "./gen/keel/payments/v1/payments_pb.js";

const transport = createGrpcTransport({ baseUrl: `http://${process.argv[2]}` });
const identity = createClient(IdentityService, transport);
const catalog = createClient(CatalogService, transport);
const payments = createClient(PaymentService, transport);
const orders = createClient(OrderService, transport);
const password = "correct horse battery";
const as = (token: string) => ({ headers: { authorization: `Bearer ${token}` } });

function check(condition: boolean, what: string): void {
  if (!condition) {
    throw new Error(`node client: ${what}`);
  }
}

async function main(): Promise<void> {
  // The first user of a fresh keel is its admin.
  const admin = await identity.register({ email: "admin@example.com", password });
  const buyer = "node-buyer@example.com";
  await identity.register({ email: buyer, password, displayName: "Node Buyer" });
  const login = await identity.login({ email: buyer, password });
  check(login.tokenType === "Bearer", `token type ${login.tokenType}`);

  const lamp = await catalog.createProduct(
    {
      product: { title: "Lamp", price: { currencyCode: "EUR", units: 2500n }, stock: 5n },
      requestId: randomUUID(),
    },
    as(admin.accessToken),
  );
  await payments.topUpWallet(
    {
      name: "users/me/wallet",
      amount: { currencyCode: "EUR", units: 10000n },
      requestId: randomUUID(),
    },
    as(login.accessToken),
  );
  const placed = await orders.placeOrder(
    {
      parent: "users/me",
      order: { lineItems: [{ product: lamp.name, quantity: 2n }] },
      requestId: randomUUID(),
    },
    as(login.accessToken),
  );
  let state = placed.state;
  for await (const change of orders.watchOrder({ name: placed.name }, as(login.accessToken))) {
    state = change.order?.state ?? state;
    if (state !== Order_State.PENDING) {
      break;
    }
  }
  check(state === Order_State.CONFIRMED, `order settled as ${Order_State[state]}`);
  check(placed.total === undefined || placed.total.units >= 0n, "a total");

  // A refused call carries google.rpc.BadRequest: which field, and why.
  try {
    await catalog.createProduct(
      { product: { title: "", price: { currencyCode: "EUR", units: 100n } } },
      as(admin.accessToken),
    );
    check(false, "an empty title was accepted");
  } catch (error) {
    const refused = ConnectError.from(error);
    check(refused.code === Code.InvalidArgument, `code ${Code[refused.code]}`);
    const fields = refused.findDetails(BadRequestSchema).flatMap((d) => d.fieldViolations);
    check(
      fields.some((v) => v.field === "product.title"),
      `violations ${JSON.stringify(fields)}`,
    );
  }
  console.log("node client: ok");
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
