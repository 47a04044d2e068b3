"""permissions.*: permissions and roles (named sets of permissions)."""
from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from keysvc.errors import BadRequest
from keysvc.store import records as r

from ..auth import require
from ..routing import Page, route
from ..wire import REQUEST, Cursor, Empty, PermissionSlug, unset_if_none
from .keys import PermissionData, RoleData, permission_answer

Description = Annotated[str, Meta(max_length=512)]
Ref = Annotated[str, Meta(min_length=1, max_length=512)]


class CreatePermissionRequest(msgspec.Struct, **REQUEST):
    name: Annotated[str, Meta(min_length=1, max_length=512)]
    slug: PermissionSlug
    description: Description | UnsetType = UNSET


class CreatePermissionData(msgspec.Struct, rename="camel"):
    permission_id: str


class PermissionRef(msgspec.Struct, **REQUEST):
    permission: Ref


class UpdatePermissionRequest(msgspec.Struct, **REQUEST):
    permission: Ref
    name: Annotated[str, Meta(min_length=1, max_length=512)] | UnsetType = UNSET
    slug: PermissionSlug | UnsetType = UNSET
    description: Description | None | UnsetType = UNSET


class ListRequest(msgspec.Struct, **REQUEST):
    limit: Annotated[int, Meta(ge=1, le=100)] = 100
    cursor: Cursor | UnsetType = UNSET
    search: Annotated[str, Meta(max_length=255)] | UnsetType = UNSET


class CreateRoleRequest(msgspec.Struct, **REQUEST):
    name: Annotated[str, Meta(min_length=1, max_length=512)]
    description: Description | UnsetType = UNSET
    permissions: Annotated[list[PermissionSlug], Meta(max_length=1000)] | UnsetType = UNSET


class CreateRoleData(msgspec.Struct, rename="camel"):
    role_id: str


class RoleRef(msgspec.Struct, **REQUEST):
    role: Ref


class UpdateRoleRequest(msgspec.Struct, **REQUEST):
    role: Ref
    name: Annotated[str, Meta(min_length=1, max_length=512)] | UnsetType = UNSET
    description: Description | None | UnsetType = UNSET


class SetRolePermissionsRequest(msgspec.Struct, **REQUEST):
    permissions: Annotated[list[PermissionSlug], Meta(max_length=1000)]
    role: Ref | UnsetType = UNSET
    role_id: Ref | UnsetType = UNSET  # deprecated spelling, still accepted


def role_answer(ctx: Any, role: r.Role) -> RoleData:
    with ctx.node.store.read() as reader:
        permissions = [permission_answer(p) for p in map(reader.permission, role.permission_ids) if p is not None]
    return RoleData(id=role.id, name=role.name, description=unset_if_none(role.description),
                    permissions=permissions or UNSET)


def optional(value: Any) -> Any:
    return None if value is UNSET else value


@route("/v2/permissions.createPermission", CreatePermissionRequest, CreatePermissionData, blocking=True)
def create_permission(ctx: Any, body: CreatePermissionRequest) -> CreatePermissionData:
    """Create a permission; its slug is what queries and keys name."""
    require(ctx.root, "rbac", "create_permission")
    permission = ctx.node.manage.create_permission(body.name, body.slug, optional(body.description))
    return CreatePermissionData(permission_id=permission.id)


@route("/v2/permissions.getPermission", PermissionRef, PermissionData)
def get_permission(ctx: Any, body: PermissionRef) -> PermissionData:
    """Read a permission by id or slug."""
    require(ctx.root, "rbac", "read_permission")
    return permission_answer(ctx.node.manage.get_permission(body.permission))


@route("/v2/permissions.updatePermission", UpdatePermissionRequest, PermissionData, blocking=True)
def update_permission(ctx: Any, body: UpdatePermissionRequest) -> PermissionData:
    """Rename a permission or change its slug or description."""
    require(ctx.root, "rbac", "update_permission")
    permission = ctx.node.manage.update_permission(body.permission, name=body.name, slug=body.slug,
                                                    description=body.description)
    return permission_answer(permission)


@route("/v2/permissions.deletePermission", PermissionRef, Empty, blocking=True)
def delete_permission(ctx: Any, body: PermissionRef) -> Empty:
    """Delete a permission; keys and roles lose it."""
    require(ctx.root, "rbac", "delete_permission")
    ctx.node.manage.delete_permission(body.permission)
    return Empty()


@route("/v2/permissions.listPermissions", ListRequest, list[PermissionData], paginated=True)
def list_permissions(ctx: Any, body: ListRequest) -> Page:
    """List permissions in id order, optionally filtered by name or slug."""
    require(ctx.root, "rbac", "read_permission")
    items, cursor = ctx.node.manage.list_permissions(body.limit, optional(body.cursor), optional(body.search))
    return Page([permission_answer(p) for p in items], cursor, cursor is not None)


@route("/v2/permissions.createRole", CreateRoleRequest, CreateRoleData, blocking=True)
def create_role(ctx: Any, body: CreateRoleRequest) -> CreateRoleData:
    """Create a role, optionally with permissions (missing ones are created)."""
    require(ctx.root, "rbac", "create_role")
    role = ctx.node.manage.create_role(body.name, optional(body.description),
                                       () if body.permissions is UNSET else body.permissions)
    return CreateRoleData(role_id=role.id)


@route("/v2/permissions.getRole", RoleRef, RoleData)
def get_role(ctx: Any, body: RoleRef) -> RoleData:
    """Read a role by id or name, with its permissions."""
    require(ctx.root, "rbac", "read_role")
    return role_answer(ctx, ctx.node.manage.get_role(body.role))


@route("/v2/permissions.updateRole", UpdateRoleRequest, RoleData, blocking=True)
def update_role(ctx: Any, body: UpdateRoleRequest) -> RoleData:
    """Rename a role or change its description."""
    require(ctx.root, "rbac", "update_role")
    return role_answer(ctx, ctx.node.manage.update_role(body.role, name=body.name, description=body.description))


@route("/v2/permissions.setRolePermissions", SetRolePermissionsRequest, list[PermissionData], blocking=True)
def set_role_permissions(ctx: Any, body: SetRolePermissionsRequest) -> list[PermissionData]:
    """Replace a role's permissions (missing ones are created)."""
    require(ctx.root, "rbac", "update_role")
    ref = body.role if body.role is not UNSET else body.role_id
    if ref is UNSET:
        raise BadRequest("role is required")
    role = ctx.node.manage.set_role_permissions(ref, body.permissions)
    with ctx.node.store.read() as reader:
        return [permission_answer(p) for p in map(reader.permission, role.permission_ids) if p is not None]


@route("/v2/permissions.deleteRole", RoleRef, Empty, blocking=True)
def delete_role(ctx: Any, body: RoleRef) -> Empty:
    """Delete a role; keys lose what it gave them."""
    require(ctx.root, "rbac", "delete_role")
    ctx.node.manage.delete_role(body.role)
    return Empty()


@route("/v2/permissions.listRoles", ListRequest, list[RoleData], paginated=True)
def list_roles(ctx: Any, body: ListRequest) -> Page:
    """List roles in id order, optionally filtered by name."""
    require(ctx.root, "rbac", "read_role")
    items, cursor = ctx.node.manage.list_roles(body.limit, optional(body.cursor), optional(body.search))
    return Page([role_answer(ctx, role) for role in items], cursor, cursor is not None)
