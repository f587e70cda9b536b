"""Packaging for mailsrv: a Python mail server for a small office host."""

from setuptools import find_packages, setup

setup(
    name="mailsrv",
    version="0.1.0",
    description="Mail server for a small office: MPP, POP3, POP, ODMR, SMTP, one SQL database",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mailsrv", "mailsrv.*"]),
    package_data={"mailsrv": ["migrations/*.py", "migrations/versions/*.py", "migrations/*.mako"]},
    install_requires=[
        # the Raw path (mailsrv/db.py) reads SQLAlchemy's compiled statements: a new minor
        # series is taken only once tests/test_db.py passes on it
        "sqlalchemy>=2.1,<2.2",
        "alembic>=1.12",
        "bcrypt>=4.0",
        "psycopg[binary]>=3.1",
        "dnspython>=2.4",
        "dkimpy>=1.1",
        "prometheus_client>=0.17",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2.1", "aiosmtpd>=1.4", "hypothesis>=6"],
        "lint": ["ruff>=0.4"],
    },
    entry_points={"console_scripts": ["mailsrv = mailsrv.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Email :: Post-Office :: POP3",
    ],
)
