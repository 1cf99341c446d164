"""Geometry the scripted expert plans with: object extents from their collision geoms (body origins
differ per object, so heights come from the geoms, not the origins) and the orientation error in the
OSC_POSE rotation convention."""

from __future__ import annotations

import numpy as np

from common.sim.libero_env import LiberoTaskEnv


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (x, y, z, w) quaternions."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
        aw * bw - ax * bx - ay * by - az * bz,
    ])


def rotation_error(target_xyzw: np.ndarray, current_xyzw: np.ndarray) -> np.ndarray:
    """World-frame axis-angle rotating `current` onto `target` (OSC_POSE rotation convention)."""
    conj = current_xyzw * np.array([-1.0, -1.0, -1.0, 1.0])
    q = quat_mul(target_xyzw, conj)
    if q[3] < 0:
        q = -q
    vec_norm = np.linalg.norm(q[:3])
    if vec_norm < 1e-9:
        return np.zeros(3)
    angle = 2.0 * np.arctan2(vec_norm, q[3])
    return q[:3] / vec_norm * angle


class ObjectGeometry:
    """Collision-geom world AABBs per object (recomputed from the live sim on each query)."""

    def __init__(self, env: LiberoTaskEnv):
        model = env.sim.model
        inner = env.env.env
        self._env = env
        self._geoms: dict[str, list[int]] = {}
        for name, body in inner.obj_body_id.items():
            geoms = []
            for g in range(model.ngeom):
                if model.geom_contype[g] == 0 and model.geom_conaffinity[g] == 0:
                    continue  # visual-only geom
                b = int(model.geom_bodyid[g])
                while b not in (body, 0):  # is geom's body the object's root or a descendant?
                    b = int(model.body_parentid[b])
                if b == body:
                    geoms.append(g)
            self._geoms[name] = geoms

    def local_aabb(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """AABB in the object's root-body frame (independent of how the object is tilted)."""
        body = self._env.env.env.obj_body_id[name]
        data = self._env.sim.data
        rot = np.asarray(data.body_xmat[body]).reshape(3, 3)
        pts = (self._points(name) - np.asarray(data.body_xpos[body])) @ rot
        return pts.min(0), pts.max(0)

    def aabb(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        pts = self._points(name)
        return pts.min(0), pts.max(0)

    def _points(self, name: str) -> np.ndarray:
        """World-frame points bounding every collision geom of the object."""
        model, data = self._env.sim.model, self._env.sim.data
        all_pts = []
        for g in self._geoms[name]:
            rot = np.asarray(data.geom_xmat[g]).reshape(3, 3)
            pos = np.asarray(data.geom_xpos[g])
            gtype, size = int(model.geom_type[g]), np.asarray(model.geom_size[g])
            if gtype == 7:  # mesh: exact vertices
                mesh = int(model.geom_dataid[g])
                start, count = int(model.mesh_vertadr[mesh]), int(model.mesh_vertnum[mesh])
                pts = np.asarray(model.mesh_vert[start : start + count]) @ rot.T + pos
            else:
                if gtype == 2:  # sphere
                    half = np.full(3, size[0])
                elif gtype == 3:  # capsule
                    half = np.array([size[0], size[0], size[1] + size[0]])
                elif gtype == 5:  # cylinder
                    half = np.array([size[0], size[0], size[1]])
                else:  # box (6) and anything else: size is half-extents
                    half = size[:3]
                corners = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)])
                pts = (corners * half) @ rot.T + pos
            all_pts.append(pts)
        if not all_pts:
            raise RuntimeError(f"object {name!r} has no collision geoms")
        return np.concatenate(all_pts)
