import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"',
                    open("molteniron/__init__.py", encoding="utf-8").read()).group(1)

setup(
    name="molteniron",
    version=VERSION,
    description="A pool of bare-metal nodes shared by CI jobs: allocate, wait, release.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["molteniron", "molteniron.*", "workers", "clients",
                                    "clients.web", "bench"]),
    package_data={"molteniron": ["migrations/*.py", "migrations/*.mako", "migrations/versions/*.py"],
                  "clients.web": ["templates/*.html", "static/*.js", "static/*.css"]},
    install_requires=[
        "SQLAlchemy>=2.0,<3",
        "PyMySQL>=1.1",
        "PyYAML>=6.0",
        "pika>=1.3,<2",
        "alembic>=1.12",
        "cryptography>=41",  # Fernet: IPMI passwords at rest (secret_key_file)
        "prometheus_client>=0.17",  # metrics_address: workers/metrics.py
        # molteniron-web (clients/web/): pure Python, no build step, no CDN
        "Flask>=3.0,<4",
        "waitress>=3.0,<4",
    ],
    extras_require={
        # testcontainers: MOLTENIRON_TEST_SERVICES=containers (tests/services.py), imported only then
        "test": ["pytest>=7", "hypothesis>=6", "testcontainers[mysql,rabbitmq]>=4.15,<5",
                 "jenkins-job-builder>=6",  # renders examples/jenkins/jjb-job.yaml in a test
                 # drives Debian's chromium + chromium-driver in tests/test_web_browser.py
                 "selenium>=4.20,<5"],
    },
    entry_points={
        "console_scripts": [
            "molteniron = clients.cli:main",
            "molteniron-worker = workers.main:main",
            "molteniron-cleaner = clients.cleaner:main",
            "molteniron-web = clients.web.main:main",
        ],
    },
)
