"""Tools for tests and demos, not for the product: ``fakebucket`` (a synthetic bucket with the real
Open Images layout), ``s3server`` (a moto S3 server on loopback) and ``proxy`` (an HTTP proxy
that misbehaves on purpose and counts what it forwards; ``faultproxy`` is its old name);
``zipreference`` (the standard library's reading of a zip directory, to compare ours with).

The S3 server needs the ``serve`` extra (``pip install 'oistream[serve]'``: moto, boto3).
"""
