// The interactive 3D viewer: three.js with GLTFLoader and OrbitControls, bundled (no CDN).
//
// It renders on demand (a frame only when the camera moves or the model changes), so an idle
// page costs no CPU, which matters on machines that render WebGL in software. The GLB is parsed
// even where WebGL is unavailable, so the page can still report the mesh and offer downloads.
import {
  Box3,
  Color,
  DirectionalLight,
  GridHelper,
  HemisphereLight,
  Material,
  Mesh,
  MeshStandardMaterial,
  Object3D,
  PerspectiveCamera,
  Scene,
  SRGBColorSpace,
  Vector3,
  WebGLRenderer,
} from "three";
import { OrbitControls } from "three/examples/jsm/controls/OrbitControls.js";
import { OBJExporter } from "three/examples/jsm/exporters/OBJExporter.js";
import { PLYExporter } from "three/examples/jsm/exporters/PLYExporter.js";
import { GLTFLoader } from "three/examples/jsm/loaders/GLTFLoader.js";

export interface ModelStats {
  meshes: number;
  vertices: number;
  triangles: number;
}

export interface PixelStats {
  width: number;
  height: number;
  /** Distinct colours among sampled pixels; 1 means a blank canvas. */
  distinctColors: number;
}

export class MeshViewer {
  private readonly scene = new Scene();
  private readonly camera = new PerspectiveCamera(35, 1, 0.01, 100);
  private readonly grid = new GridHelper(2, 16);
  private renderer: WebGLRenderer | undefined;
  private controls: OrbitControls | undefined;
  private model: Object3D | undefined;
  private frame = 0;
  private home = { position: new Vector3(0.9, 0.6, 1.6), target: new Vector3() };
  /** False once creating a WebGL context failed; the viewer then shows `fallback`. */
  webgl = true;

  constructor(
    private readonly host: HTMLElement,
    private readonly fallback: HTMLElement,
  ) {
    this.scene.add(new HemisphereLight(0xffffff, 0x444455, 2.2));
    const key = new DirectionalLight(0xffffff, 2.0);
    key.position.set(2, 3, 4);
    const rim = new DirectionalLight(0xffffff, 0.8);
    rim.position.set(-3, 2, -2);
    this.scene.add(key, rim, this.grid);
    this.grid.visible = false;
    new ResizeObserver(() => this.resize()).observe(host);
  }

  /** Parse a GLB and show it, replacing the previous model. */
  async load(bytes: Uint8Array<ArrayBuffer>): Promise<ModelStats> {
    const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    const gltf = await new GLTFLoader().parseAsync(buffer, "");
    this.clear();
    const model = gltf.scene;
    model.traverse((node) => {
      if (node instanceof Mesh) {
        for (const material of materials(node)) {
          // TripoSR colours are diffuse albedo; exporters often mark them metallic, which renders
          // black without an environment map.
          if (material instanceof MeshStandardMaterial) {
            material.metalness = 0;
            material.roughness = Math.max(material.roughness, 0.75);
          }
        }
      }
    });
    this.model = model;
    this.scene.add(model);
    this.frameModel();
    this.ensureRenderer();
    this.requestRender();
    return this.stats();
  }

  /** Meshes in the loaded model (0 when nothing is loaded). The tests read it. */
  meshCount(): number {
    return this.stats().meshes;
  }

  stats(): ModelStats {
    const stats: ModelStats = { meshes: 0, vertices: 0, triangles: 0 };
    this.model?.traverse((node) => {
      if (node instanceof Mesh) {
        stats.meshes += 1;
        const geometry = node.geometry;
        const vertices = geometry.getAttribute("position")?.count ?? 0;
        stats.vertices += vertices;
        stats.triangles += (geometry.index ? geometry.index.count : vertices) / 3;
      }
    });
    return stats;
  }

  clear(): void {
    if (!this.model) return;
    this.scene.remove(this.model);
    this.model.traverse((node) => {
      if (node instanceof Mesh) {
        node.geometry.dispose();
        for (const material of materials(node)) material.dispose();
      }
    });
    this.model = undefined;
    this.grid.visible = false;
    this.requestRender();
  }

  resetView(): void {
    this.camera.position.copy(this.home.position);
    this.controls?.target.copy(this.home.target);
    this.controls?.update();
    this.requestRender();
  }

  setWireframe(on: boolean): void {
    this.model?.traverse((node) => {
      if (node instanceof Mesh) {
        for (const material of materials(node)) {
          if ("wireframe" in material) (material as MeshStandardMaterial).wireframe = on;
        }
      }
    });
    this.requestRender();
  }

  setSpin(on: boolean): void {
    if (!this.controls) return;
    this.controls.autoRotate = on;
    this.requestRender();
  }

  /** The loaded model as Wavefront OBJ text (vertex colours included when present). */
  exportObj(): string {
    return this.model ? new OBJExporter().parse(this.model) : "";
  }

  /** The loaded model as binary PLY. */
  exportPly(): ArrayBuffer {
    let out = new ArrayBuffer(0);
    if (this.model) new PLYExporter().parse(this.model, (result) => (out = result), { binary: true });
    return out;
  }

  /** Render now and sample the canvas: proof that pixels reached the screen (tests, diagnostics). */
  pixelStats(): PixelStats | null {
    const renderer = this.renderer;
    if (!renderer) return null;
    renderer.render(this.scene, this.camera);
    const gl = renderer.getContext();
    const width = gl.drawingBufferWidth;
    const height = gl.drawingBufferHeight;
    const pixels = new Uint8Array(width * height * 4);
    gl.readPixels(0, 0, width, height, gl.RGBA, gl.UNSIGNED_BYTE, pixels);
    const colors = new Set<number>();
    const stride = Math.max(1, Math.floor((width * height) / 20000));
    for (let i = 0; i < width * height; i += stride) {
      const at = i * 4;
      colors.add(((pixels[at] ?? 0) << 24) | ((pixels[at + 1] ?? 0) << 16) | ((pixels[at + 2] ?? 0) << 8) | (pixels[at + 3] ?? 0));
    }
    return { width, height, distinctColors: colors.size };
  }

  private ensureRenderer(): void {
    if (this.renderer || !this.webgl) return;
    try {
      const renderer = new WebGLRenderer({ antialias: true, alpha: true });
      renderer.outputColorSpace = SRGBColorSpace;
      renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
      renderer.setClearColor(new Color(0x000000), 0);
      renderer.domElement.setAttribute("aria-label", "3D view of the mesh: drag to orbit, scroll to zoom");
      renderer.domElement.setAttribute("role", "img");
      this.host.append(renderer.domElement);
      const controls = new OrbitControls(this.camera, renderer.domElement);
      controls.enableDamping = true;
      controls.autoRotateSpeed = 2.5;
      controls.addEventListener("change", () => this.requestRender());
      this.renderer = renderer;
      this.controls = controls;
      this.fallback.hidden = true;
      this.resize();
      this.resetView();
    } catch {
      // No WebGL (disabled, blocklisted GPU, or an old browser): the downloads still work.
      this.webgl = false;
      this.fallback.hidden = false;
    }
  }

  private frameModel(): void {
    if (!this.model) return;
    const box = new Box3().setFromObject(this.model);
    const size = box.getSize(new Vector3());
    const center = box.getCenter(new Vector3());
    const radius = Math.max(size.length() / 2, 1e-3);
    const distance = radius / Math.sin(((this.camera.fov / 2) * Math.PI) / 180);
    this.camera.near = distance / 100;
    this.camera.far = distance * 100;
    this.camera.updateProjectionMatrix();
    const direction = new Vector3(0.55, 0.35, 1).normalize();
    this.home = { position: center.clone().addScaledVector(direction, distance * 1.05), target: center };
    this.grid.scale.setScalar(Math.max(size.x, size.z, 1e-3) * 1.6 / 2);
    this.grid.position.set(center.x, box.min.y, center.z);
    this.grid.visible = true;
    this.resetView();
  }

  private resize(): void {
    if (!this.renderer) return;
    const width = Math.max(1, this.host.clientWidth);
    const height = Math.max(1, this.host.clientHeight);
    this.renderer.setSize(width, height, false);
    this.camera.aspect = width / height;
    this.camera.updateProjectionMatrix();
    this.requestRender();
  }

  private requestRender(): void {
    if (!this.renderer || this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      const moving = this.controls?.update() ?? false;
      this.renderer?.render(this.scene, this.camera);
      if (moving || this.controls?.autoRotate) this.requestRender();
    });
  }
}

function materials(mesh: Mesh): Material[] {
  return Array.isArray(mesh.material) ? mesh.material : [mesh.material];
}
