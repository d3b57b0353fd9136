"""Smoke-test program: `hello` prints a line; `s3-put` writes an object to the S3 server given in env."""

import io
import os
import sys

if sys.argv[1:] == ["hello"]:
    print("kubetune-smoke: hello from a pod", flush=True)
elif sys.argv[1:] == ["s3-put"]:
    from minio import Minio

    endpoint = os.environ["S3_ENDPOINT"].removeprefix("http://")
    client = Minio(endpoint, access_key=os.environ["AWS_ACCESS_KEY_ID"],
                   secret_key=os.environ["AWS_SECRET_ACCESS_KEY"], secure=False, region="us-east-1")
    body = os.environ["S3_BODY"].encode()
    client.put_object(os.environ["S3_BUCKET"], os.environ["S3_KEY"], io.BytesIO(body), len(body))
    print(f"kubetune-smoke: wrote s3://{os.environ['S3_BUCKET']}/{os.environ['S3_KEY']}", flush=True)
else:
    sys.exit(f"usage: smoke.py hello|s3-put (got {sys.argv[1:]})")
