"""The fake Razorpay: the gateway, its HTTP server, the controls the harness drives, signing."""
