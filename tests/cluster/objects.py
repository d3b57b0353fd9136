"""Cleanup helpers for objects the tests and benches leave in the cluster."""

from __future__ import annotations

from typing import Any

RUNS = ("kubetune.io", "v1alpha1", "finetuneruns")


def delete_namespace(api_client: Any, namespace: str) -> None:
    """Delete a test namespace, first releasing its FinetuneRuns from the operator's finalizer.

    Tests and benches stop their operator before the namespace goes; a run that still carries the finalizer
    would keep the namespace Terminating for ever (nothing is left to remove the finalizer)."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)
    try:
        listed: dict[str, Any] = custom.list_namespaced_custom_object(*RUNS[:2], namespace, RUNS[2])  # type: ignore[assignment]
    except client.ApiException as e:
        if e.status != 404:  # 404: no CRD or no namespace: nothing to release
            raise
        listed = {"items": []}
    for run in listed["items"]:
        if run["metadata"].get("finalizers"):
            try:
                custom.patch_namespaced_custom_object(*RUNS[:2], namespace, RUNS[2], run["metadata"]["name"],
                                                      {"metadata": {"finalizers": None}})
            except client.ApiException as e:
                if e.status != 404:
                    raise
    try:
        client.CoreV1Api(api_client).delete_namespace(namespace, propagation_policy="Background")
    except client.ApiException as e:
        if e.status != 404:
            raise
