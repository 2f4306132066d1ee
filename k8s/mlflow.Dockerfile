# The MLflow tracking server's image: the official one plus what k8s/mlflow.yaml needs, baked in
# so that nothing is pip-installed when a pod starts (air-gapped clusters, reproducible pods):
#   psycopg2-binary  the PostgreSQL backend and auth stores
#   boto3            the S3 artifact store (--serve-artifacts)
#   Flask-WTF        CSRF protection of `mlflow server --app-name basic-auth`
# and a non-root user. Build and push it next to the project's image (k8s/README.md, step 2):
#   docker build -f k8s/mlflow.Dockerfile -t ghcr.io/OWNER/lstm-pipeline-mlflow:3.17.2 k8s/
# The tag is the MLflow version; tests/test_k8s.py checks it against the base image's.
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.5 Flask-WTF==1.3.0 \
 && useradd --uid 10001 --gid 0 --no-create-home --shell /usr/sbin/nologin mlflow

USER 10001
