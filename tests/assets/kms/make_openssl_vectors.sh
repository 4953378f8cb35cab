#!/bin/sh
# Regenerates the openssl-made envelopes in this folder (see README.md). Needs OpenSSL >= 3.0.
set -eu
cd "$(dirname "$0")"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out recipient-key.pem 2>/dev/null
# KMS names the recipient by SHA-256 of the DER SubjectPublicKeyInfo; openssl -keyid copies the
# certificate's SKI extension, so put that value there.
ski=$(openssl pkey -in recipient-key.pem -pubout -outform DER | openssl dgst -sha256 -binary \
      | od -An -tx1 | tr -s ' \n' ':' | sed 's/^://; s/:$//')
openssl req -x509 -new -key recipient-key.pem -subj "/CN=enclavekit test recipient" -days 36500 \
    -set_serial 4660 -addext "subjectKeyIdentifier=$ski" -out recipient-cert.pem
printf 'Hello from openssl cms -encrypt\n' > plaintext.txt
for form in keyid issuer; do
    flag=""; [ "$form" = keyid ] && flag="-keyid"
    openssl cms -encrypt -binary $flag -aes256 -in plaintext.txt -outform DER \
        -recip recipient-cert.pem -keyopt rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha256 \
        -keyopt rsa_mgf1_md:sha256 -out "openssl-oaep-$form.der"
done
# A PKCS#1 v1.5 envelope: valid CMS that KMS never sends; enclavekit must refuse it.
openssl cms -encrypt -binary -aes256 -in plaintext.txt -outform DER -recip recipient-cert.pem \
    -out openssl-pkcs1v15.der
