// token-server is a bearer-token endpoint for docker-registry's `auth:
// token` in stargaze's tests: it checks Basic credentials, grants the
// scopes asked for (pull everywhere, push except under "readonly/"), and
// signs ES256 JWTs with a self-signed certificate that the registry trusts
// through `rootcertbundle`. Each token request is logged as a JSON line.
// With -refresh-token, an OAuth2 refresh-token grant (a POSTed form with
// grant_type=refresh_token, as docker's identity tokens are used) that
// presents it is authorized as the user too.
//
// Usage: token-server -addr 127.0.0.1:PORT -cert OUT.pem -log LOG
//        -user U -password P [-refresh-token T] -issuer I -service S
//        -lifetime SECONDS
//
// The registry accepts a token up to 60 s after its `exp` (its leeway), so
// a token meant to live N < 60 seconds gets exp = now + N - 60.
//
// Test tooling built by stargaze's test kit, not part of the product.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

type access struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

var (
	addr     = flag.String("addr", "127.0.0.1:0", "listen address")
	certOut  = flag.String("cert", "", "where to write the signing certificate (PEM)")
	logPath  = flag.String("log", "", "JSON lines of token requests")
	user     = flag.String("user", "", "user name")
	password = flag.String("password", "", "password")
	refresh  = flag.String("refresh-token", "", "refresh token accepted for the user (POSTed grant_type=refresh_token)")
	issuer   = flag.String("issuer", "stargaze-test-issuer", "iss claim")
	lifetime = flag.Int("lifetime", 300, "seconds a token is accepted")
	logMu    sync.Mutex
)

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func main() {
	flag.Parse()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		log.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "stargaze test token signer"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(48 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		log.Fatal(err)
	}
	if err := os.WriteFile(*certOut, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		log.Fatal(err)
	}
	logFile, err := os.OpenFile(*logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		log.Fatal(err)
	}
	http.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
		u, p, ok := r.BasicAuth()
		// The query, and for a POST its form as well.
		r.ParseForm()
		q := r.Form
		var scopes []string
		for _, s := range q["scope"] {
			scopes = append(scopes, strings.Fields(s)...)
		}
		var granted []access
		authorized := ok && u == *user && p == *password
		grant := "basic"
		if r.Method == http.MethodPost && q.Get("grant_type") == "refresh_token" {
			grant = "refresh_token"
			u = *user
			authorized = *refresh != "" && q.Get("refresh_token") == *refresh
		}
		if authorized {
			for _, s := range scopes {
				parts := strings.Split(s, ":")
				if len(parts) < 3 || parts[0] != "repository" {
					continue
				}
				name := strings.Join(parts[1:len(parts)-1], ":")
				var actions []string
				for _, a := range strings.Split(parts[len(parts)-1], ",") {
					if a == "pull" || (a == "push" && !strings.HasPrefix(name, "readonly/")) {
						actions = append(actions, a)
					}
				}
				granted = append(granted, access{Type: "repository", Name: name, Actions: actions})
			}
		}
		logMu.Lock()
		line, _ := json.Marshal(map[string]interface{}{
			"user": u, "authorized": authorized, "scopes": scopes, "grant": grant,
			"service": q.Get("service"), "granted": granted,
		})
		logFile.Write(append(line, '\n'))
		logMu.Unlock()
		if !authorized {
			w.Header().Set("WWW-Authenticate", `Basic realm="token"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}`, http.StatusUnauthorized)
			return
		}
		now := time.Now()
		header, _ := json.Marshal(map[string]interface{}{
			"typ": "JWT", "alg": "ES256",
			"x5c": []string{base64.StdEncoding.EncodeToString(der)},
		})
		var jti [8]byte
		rand.Read(jti[:])
		claims, _ := json.Marshal(map[string]interface{}{
			"iss": *issuer, "sub": u, "aud": q.Get("service"),
			"exp": now.Add(time.Duration(*lifetime-60) * time.Second).Unix(),
			"nbf": now.Add(-10 * time.Second).Unix(),
			"iat": now.Unix(), "jti": fmt.Sprintf("%x", jti),
			"access": granted,
		})
		input := b64(header) + "." + b64(claims)
		digest := sha256.Sum256([]byte(input))
		rr, ss, err := ecdsa.Sign(rand.Reader, key, digest[:])
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		sig := make([]byte, 64)
		rr.FillBytes(sig[:32])
		ss.FillBytes(sig[32:])
		token := input + "." + b64(sig)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]interface{}{
			"token": token, "access_token": token,
			"expires_in": *lifetime, "issued_at": now.UTC().Format(time.RFC3339),
		})
	})
	log.Fatal(http.ListenAndServe(*addr, nil))
}
