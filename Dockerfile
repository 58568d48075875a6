# One image for every HseShop process; the command picks the process (docker-compose.yml shows all):
#   gunicorn -b 0.0.0.0:8001 ... "orders_app:create_app()"         (the default, below)
#   gunicorn -b 0.0.0.0:8002 ... "payments_app:create_app()"
#   gunicorn -b 0.0.0.0:8000 ... "gateway_app:create_app()"
#   python -m shared.grpc_server orders                             (and payments)
#   celery -A tasks worker -Q orders.control,orders -n orders@%h -P threads -c 16 --consume orders
#                                                                   (and payments, gateway)
#   celery -A tasks beat -s /var/lib/hseshop/beat/celerybeat-schedule --alive-file /tmp/alive
#                                                                   (exactly one; -s: a directory
#                                                                   its user owns, on a volume
#                                                                   kept across recreates;
#                                                                   --alive-file: what its
#                                                                   healthcheck reads)
#   celery -A tasks flower --conf=/app/flowerconfig.py
#   python -m shared.migrations upgrade orders                      (and payments, gateway)
# Settings come from the environment: every variable of shared/config.py (deploy/compose.env),
# a process's database URL that of its own service alone (deploy/orders.env, ...), and a secret
# only to a process that signs or verifies with it (deploy/token-signing.env, internal-auth.env).
FROM python:3.11-slim

# PYTHONPATH: the code, on the import path of every process. A console script starts with its own
# directory there, not the working directory (gunicorn adds that itself); celery adds it only while
# it imports `-A tasks`, and a worker imports its service's package later (tasks/services.py).
ENV PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# Runtime dependencies only (requirements/dev.txt adds the local stand-ins and test tools), in
# their own layer so that a code change does not reinstall them. Every one ships a manylinux
# wheel, so the slim image needs no compiler.
COPY requirements/base.txt requirements/constraints.txt requirements/
RUN pip install -r requirements/base.txt

# The code belongs to root and is only readable by the user the processes run as. COPY keeps the
# modes the files have in the checkout, which a builder's umask sets (077: files only their owner
# reads, and root alone would read the code; 000: anyone's to write): they are set here instead.
# Beat's schedule directory is the user's: compose mounts a named volume there, which takes the
# directory's owner and mode when it is first used (a directory the image lacks would be made
# root's, and beat, unable to write its schedule, would exit as it started).
COPY . .
RUN python -m compileall -q /app \
    && chmod -R u=rwX,go=rX /app \
    && groupadd --system --gid 10001 hseshop \
    && useradd --system --uid 10001 --gid hseshop --home-dir /home/hseshop --create-home \
       --shell /usr/sbin/nologin hseshop \
    && install -d -o hseshop -g hseshop -m 0700 /var/lib/hseshop/beat

USER 10001:10001

EXPOSE 8000 8001 8002 5555

# For the default command; docker-compose.yml gives every other long-running process a check of
# its own, and turns this one off for the migrations, which never answer it.
HEALTHCHECK --interval=10s --timeout=8s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/health', timeout=5)"]

CMD ["gunicorn", "-b", "0.0.0.0:8001", "-w", "2", "--threads", "4", \
     "-k", "shared.gunicorn_worker.JsonErrorsThreadWorker", "--no-control-socket", \
     "orders_app:create_app()"]
