"""The reference web application: the form page, POST /send and its checks (form, body, CSRF)."""
