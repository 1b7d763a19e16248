/**
 * Generated-style references to the app's functions (what `npx convex codegen` writes,
 * without the types): `api.documents.create`, `internal.byod.readStamp`, and so on.
 */
import { anyApi, componentsGeneric } from "convex/server";

export const api = anyApi;
export const internal = anyApi;
export const components = componentsGeneric();
