// The two model services over gRPC-Web (binary framing) through the gateway that serves this
// page, so the base URL is the page's own origin and no CORS is involved. Binary, not text
// mode: text costs a third more bytes, and grpcio has no JSON codec for grpc-web+json.
import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { Img2ImgProvider } from "./gen/kiln/img2img/v1/img2img_service_pb.js";
import { MeshProvider } from "./gen/kiln/mesh/v1/mesh_service_pb.js";

const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  useBinaryFormat: true,
});

export const img2img: Client<typeof Img2ImgProvider> = createClient(Img2ImgProvider, transport);
export const mesh: Client<typeof MeshProvider> = createClient(MeshProvider, transport);

/** URL of a stored artifact's download route on the gateway (`GET /v1/artifacts/<job>/<file>`). */
export function artifactUrl(artifactId: string): string {
  return `${location.origin}/v1/artifacts/${artifactId.split("/").map(encodeURIComponent).join("/")}`;
}
