"""mailsrv: the mail server of a small office host (MPP, POP3, POP, ODMR, SMTP, one SQL database)."""

__version__ = "0.1.0"
